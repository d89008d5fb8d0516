//! `cargo xtask bench` in miniature, so the bench cannot rot. It checks that every section runs
//! and reports, and that no request failed during its upgrades; it asserts nothing about speed.

use std::process::Command;

#[test]
fn the_bench_runs_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let bench = integration_tests::workspace_bin("hotswap-bench");
    let out = Command::new(bench)
        .args(["--smoke", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(
        report["connection_path"]["ratios"]
            .as_array()
            .unwrap()
            .len(),
        7
    );
    assert!(
        report["connection_path"]["program_ns_per_run"]["steered_connection"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    assert!(report["switch"]["map_update_us"]["p50"].as_f64().is_some());
    assert!(report["switch"]["reuseport"]["program_replace_us"]["p50"]
        .as_f64()
        .is_some());
    assert!(report["switch"]["reuseport"]["hotswap_switch_ms"]["p50"]
        .as_f64()
        .is_some());
    let upgrades = report["upgrades"].as_array().unwrap();
    let backends: Vec<&str> = upgrades
        .iter()
        .map(|u| u["backend"].as_str().unwrap())
        .collect();
    assert_eq!(
        backends,
        [
            "sk-lookup",
            "sk-lookup",
            "sk-lookup",
            "uds",
            "uds",
            "reuseport",
            "reuseport"
        ]
    );
    // With --handoff the keep-alive client's one connection outlives every upgrade.
    let handed = upgrades
        .iter()
        .find(|u| u["server"] == "hello --handoff")
        .expect("hello --handoff is measured");
    assert_eq!(
        handed["keep_alive"]["reconnects_per_upgrade"], 0.0,
        "{handed}"
    );
    assert!(report["idle_drain"]["handoff_ms_median"].as_f64().is_some());
    assert!(report["idle_drain"]["plain_ms_median"].as_f64().is_some());
    let peers = report["peers"].as_array().unwrap();
    assert_eq!(peers.len(), 3);
    // nginx under hotswap loses no new connection in its upgrades.
    let under_hotswap = peers
        .iter()
        .find(|p| p["server"] == "nginx (hotswap upgrade)")
        .expect("nginx under hotswap is measured");
    assert_eq!(under_hotswap["failed_upgrades"], 0, "{under_hotswap}");
    assert_eq!(
        under_hotswap["new_connection_per_request"]["failed"], 0,
        "{under_hotswap}"
    );
    assert!(report["scale"]["verified_instructions"].as_u64().unwrap() > 0);
    for operation in ["bind", "bind_new_service", "register", "switch"] {
        assert!(
            report["scale"]["control_plane_per_second"][operation]
                .as_f64()
                .unwrap()
                > 0.0
        );
    }
}

#[test]
fn the_bench_runs_only_the_sections_asked_for() {
    let bench = integration_tests::workspace_bin("hotswap-bench");
    let out = Command::new(&bench)
        .args(["--smoke", "--only", "switch"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("map update"), "{table}");
    assert!(!table.contains("s/upgrade"), "{table}");

    let out = Command::new(&bench)
        .args(["--smoke", "--only", "switch,warp"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown bench section \"warp\""));
}
