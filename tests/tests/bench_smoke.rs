//! `cargo xtask bench` in miniature, so the bench cannot rot. It checks that every section runs
//! and reports, and that no request failed during its upgrades; it asserts nothing about speed.

use std::process::Command;

#[test]
fn the_bench_runs_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let bench = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(|d| d.parent())
        .unwrap()
        .join("hotswap-bench");
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
    assert_eq!(report["connection_path"].as_array().unwrap().len(), 4);
    assert!(report["switch"]["map_update_us"]["p50"].as_f64().is_some());
    assert_eq!(report["upgrades"].as_array().unwrap().len(), 4);
    assert!(report["scale"]["verified_instructions"].as_u64().unwrap() > 0);
}
