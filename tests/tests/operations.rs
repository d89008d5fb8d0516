//! What an operator deploys around the daemon: the config file (applied at start, on `hotswap
//! reload` and on SIGHUP, as a diff, whole or not at all; `hotswap config check`) and the
//! Prometheus endpoint (`--metrics-listen`), checked with the Prometheus project's own parser.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use integration_tests::{
    hotswap_bin, tcp_request, wait_until, Load, RunningService, Server, TestEnv,
};
use nix::sys::signal::Signal;
use serde_json::Value;

/// `[[service]]` tables: (name, bindings).
fn config(services: &[(&str, &[&str])]) -> String {
    let mut text = String::new();
    for (name, bindings) in services {
        let bind: Vec<String> = bindings.iter().map(|b| format!("{b:?}")).collect();
        text.push_str(&format!(
            "[[service]]\nname = \"{name}\"\nbind = [{}]\n\n",
            bind.join(", ")
        ));
    }
    text
}

/// A service's bindings in `hotswap status --json`, as the command line spells them (empty
/// for a service the daemon does not know).
fn bindings(env: &TestEnv, service: &str) -> Vec<String> {
    let status = env.status();
    let Some(found) = status["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == service)
    else {
        return Vec::new();
    };
    found["bindings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            format!(
                "{} {} {}",
                b["protocol"].as_str().unwrap(),
                b["prefix"].as_str().unwrap(),
                b["port"]
            )
        })
        .collect()
}

/// A daemon whose config file holds `text`, started.
fn daemon_with_config(name: &str, text: &str) -> TestEnv {
    let mut env = TestEnv::new(name);
    std::fs::write(&env.config, text).unwrap();
    env.start_daemon();
    env
}

/// A server for `service`, registered and active.
fn serve(env: &TestEnv, service: &str) -> Server {
    let server = Server::start("tcp", "127.0.0.1:0", service);
    env.register(service, &server, &["--activate"]);
    server
}

#[test]
fn config_file_binds_its_services_at_start() {
    let env = daemon_with_config(
        "config-start",
        &config(&[
            ("web", &["tcp 127.0.0.1/32 8080"]),
            ("api", &["tcp 127.0.0.1/32 8081", "tcp ::1/128 8081"]),
        ]),
    );
    assert_eq!(bindings(&env, "web"), ["tcp 127.0.0.1/32 8080"]);
    assert_eq!(
        bindings(&env, "api"),
        ["tcp 127.0.0.1/32 8081", "tcp ::1/128 8081"]
    );
    let (_web, _api) = (serve(&env, "web"), serve(&env, "api"));
    assert_eq!(tcp_request("127.0.0.1:8080").unwrap(), "web");
    assert_eq!(tcp_request("127.0.0.1:8081").unwrap(), "api");
    assert!(
        env.daemon_log()
            .contains("bound tcp 127.0.0.1/32 8080 to service web"),
        "{}",
        env.daemon_log()
    );
}

/// A reload adds what is new, removes what is gone and leaves the rest alone: a client of the
/// unchanged service, connecting all the while, sees no failure.
#[test]
fn reload_applies_the_difference_and_disturbs_no_unchanged_service() {
    let env = daemon_with_config(
        "config-reload",
        &config(&[
            ("web", &["tcp 127.0.0.1/32 8080"]),
            ("api", &["tcp 127.0.0.1/32 8081"]),
        ]),
    );
    let (_web, _api) = (serve(&env, "web"), serve(&env, "api"));
    let load = Load::start("127.0.0.1:8080", 1_000_000);
    wait_until("the client is served", || {
        tcp_request("127.0.0.1:8080").is_ok()
    });
    std::fs::write(
        &env.config,
        config(&[
            ("web", &["tcp 127.0.0.1/32 8080"]),
            ("db", &["tcp 127.0.0.1/32 8082"]),
        ]),
    )
    .unwrap();
    let out = env.ok(&["reload"]);
    assert!(
        out.contains("unbound tcp 127.0.0.1/32 8081 from service api"),
        "{out}"
    );
    assert!(
        out.contains("bound tcp 127.0.0.1/32 8082 to service db"),
        "{out}"
    );
    assert!(
        out.contains("reloaded: 2 changes, 1 services unchanged"),
        "{out}"
    );
    assert!(!out.contains("service web"), "{out}");
    // Reloading the same file again changes nothing.
    assert!(env
        .ok(&["reload"])
        .contains("reloaded: 0 changes, 2 services unchanged"));
    std::thread::sleep(Duration::from_millis(200));
    let report = load.stop();
    assert_eq!(report.failed, 0, "{report:?}");
    assert!(report.served() > 0, "{report:?}");
    assert!(bindings(&env, "api").is_empty());
    assert_eq!(bindings(&env, "db"), ["tcp 127.0.0.1/32 8082"]);
    assert_eq!(bindings(&env, "web"), ["tcp 127.0.0.1/32 8080"]);
    // What the config no longer steers is refused (nothing else listens there).
    assert!(tcp_request("127.0.0.1:8081").is_err());
}

/// A broken file, or one that cannot be applied whole, changes nothing, and says where or why.
#[test]
fn reload_of_a_broken_or_conflicting_file_changes_nothing() {
    let env = daemon_with_config(
        "config-broken",
        &config(&[("web", &["tcp 127.0.0.1/32 8080"])]),
    );
    let _web = serve(&env, "web");
    env.ok(&["bind", "manual", "tcp", "127.0.0.1/32", "9000"]);
    let before = env.status();
    // Writes `text` as the config, asks for a reload, which must fail and change nothing;
    // returns its one line.
    let refused_reload = |text: &str| {
        std::fs::write(&env.config, text).unwrap();
        let line = env.fails(&["reload"]);
        assert_eq!(env.status()["services"], before["services"], "{line}");
        line
    };

    // Not TOML at line 3.
    let line = refused_reload("[[service]]\nname = \"web\"\nbind = [\"tcp 127.0.0.1/32 8080\"\n");
    assert!(line.contains("hotswap.toml:3:"), "{line}");

    // A binding with host bits, at line 3 column 9 (the string).
    let line = refused_reload("[[service]]\nname = \"api\"\nbind = [\"tcp 127.0.0.1/8 8081\"]\n");
    assert!(line.contains("hotswap.toml:3:9"), "{line}");

    // Valid, but one binding is another service's (bound by hand): the first change of the
    // plan (api's binding) is undone, web keeps serving.
    let line = refused_reload(&config(&[
        ("api", &["tcp 127.0.0.1/32 8081"]),
        ("other", &["tcp 127.0.0.1/32 9000"]),
        ("web", &["tcp 127.0.0.1/32 8080"]),
    ]));
    assert!(line.contains("nothing of it was"), "{line}");
    assert!(line.contains("manual"), "{line}");
    assert!(bindings(&env, "api").is_empty());
    assert_eq!(tcp_request("127.0.0.1:8080").unwrap(), "web");

    // And the config the daemon remembers applying is still the first one: removing web from
    // a fixed file unbinds it.
    std::fs::write(&env.config, config(&[("api", &["tcp 127.0.0.1/32 8081"])])).unwrap();
    env.ok(&["reload"]);
    assert!(bindings(&env, "web").is_empty());
    assert_eq!(bindings(&env, "manual"), ["tcp 127.0.0.1/32 9000"]);
}

/// SIGHUP (the unit's ExecReload) reloads as `hotswap reload` does.
#[test]
fn sighup_reloads_the_config() {
    let env = daemon_with_config(
        "config-sighup",
        &config(&[("web", &["tcp 127.0.0.1/32 8080"])]),
    );
    std::fs::write(
        &env.config,
        config(&[("web", &["tcp 127.0.0.1/32 8080", "tcp 127.0.0.1/32 8443"])]),
    )
    .unwrap();
    let pid = env.daemon_pid().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGHUP).unwrap();
    wait_until("SIGHUP applies the file", || {
        bindings(&env, "web").len() == 2
    });
    // Still the same daemon, still answering.
    assert_eq!(env.daemon_pid(), Some(pid));
    assert!(env.hotswap(&["status"]).status.success());
    assert!(
        env.daemon_log()
            .contains("bound tcp 127.0.0.1/32 8443 to service web"),
        "{}",
        env.daemon_log()
    );
}

/// A restarted daemon applies the file against what it applied before: a service dropped from
/// the file while the daemon was down loses its bindings, one bound by hand keeps them.
#[test]
fn restart_applies_the_file_against_what_was_applied_before() {
    let mut env = daemon_with_config(
        "config-restart",
        &config(&[
            ("web", &["tcp 127.0.0.1/32 8080"]),
            ("api", &["tcp 127.0.0.1/32 8081"]),
        ]),
    );
    env.ok(&["bind", "manual", "tcp", "127.0.0.1/32", "9000"]);
    env.stop_daemon(Signal::SIGTERM);
    std::fs::write(&env.config, config(&[("web", &["tcp 127.0.0.1/32 8080"])])).unwrap();
    env.start_daemon();
    assert_eq!(bindings(&env, "web"), ["tcp 127.0.0.1/32 8080"]);
    assert!(bindings(&env, "api").is_empty());
    assert_eq!(bindings(&env, "manual"), ["tcp 127.0.0.1/32 9000"]);

    // A broken file stops the start, saying where.
    env.stop_daemon(Signal::SIGTERM);
    std::fs::write(
        &env.config,
        "[[service]]\nname = \"web\"\nbind = [\"tcp 127.0.0.1/8 8080\"]\n",
    )
    .unwrap();
    let log = env.try_start_daemon().unwrap_err();
    assert!(log.contains("hotswap.toml:3:9"), "{log}");
}

#[test]
fn config_check_validates_without_a_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hotswap.toml");
    let check = |text: &str| {
        std::fs::write(&path, text).unwrap();
        Command::new(hotswap_bin())
            .args(["config", "check"])
            .arg(&path)
            .env("HOTSWAP_SOCKET", dir.path().join("no-daemon.sock"))
            .output()
            .unwrap()
    };
    let good = check(&config(&[
        ("web", &["tcp 0.0.0.0/0 80", "tcp ::/0 80"]),
        ("dns", &["udp 127.0.0.1/32 53"]),
    ]));
    assert!(good.status.success(), "{good:?}");
    let stdout = String::from_utf8(good.stdout).unwrap();
    assert!(
        stdout.contains("service web: tcp 0.0.0.0/0 80, tcp ::/0 80"),
        "{stdout}"
    );
    assert!(stdout.contains("ok (2 services)"), "{stdout}");

    for (text, expected) in [
        ("[[service]]\nname = \"web\"\nport = 80\n", ":3:1"),
        (
            "[[service]]\nname = \"web\"\nowner = \"no-such-user-xyz\"\nbind = [\"tcp 127.0.0.1/32 80\"]\n",
            ":3:9",
        ),
        (
            "[[service]]\nname = \"web\"\ngroup = \"root\"\n",
            "has an owner but no binding",
        ),
        (
            &config(&[
                ("a", &["tcp 127.0.0.1/32 80"]),
                ("b", &["tcp 127.0.0.1/32 80"]),
            ]),
            "bound to service a already",
        ),
    ] {
        let bad = check(text);
        assert!(!bad.status.success());
        let stderr = String::from_utf8(bad.stderr).unwrap();
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(expected), "{expected}: {stderr}");
    }
    let missing = Command::new(hotswap_bin())
        .args(["config", "check"])
        .arg(dir.path().join("missing.toml"))
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert_eq!(String::from_utf8_lossy(&missing.stderr).lines().count(), 1);
}

/// `GET path` with `accept`, on a connection of its own; returns (status line, content type,
/// body).
fn scrape(port: u16, path: &str, accept: &str) -> (String, String, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to the exporter");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nhost: test\r\naccept: {accept}\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("a response head");
    let mut lines = head.lines();
    let status = lines.next().unwrap().to_owned();
    let content_type = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_default();
    (status, content_type, body.to_owned())
}

/// The Python Prometheus client, installed by `cargo xtask test`.
fn prometheus_python() -> PathBuf {
    PathBuf::from(std::env::var_os("HOTSWAP_PROMETHEUS_PYTHON").expect(
        "HOTSWAP_PROMETHEUS_PYTHON is unset: run the tests through `cargo xtask test`, \
         which installs the Prometheus parser",
    ))
}

/// Parses `text` with the Prometheus client's parser for `format` (`text` or `openmetrics`);
/// returns its families as `{name, type, help, unit, samples: [{name, labels, value}]}`.
fn parse(format: &str, text: &str) -> Vec<Value> {
    const SCRIPT: &str = r#"
import json, sys
if sys.argv[1] == "openmetrics":
    from prometheus_client.openmetrics.parser import text_string_to_metric_families
else:
    from prometheus_client.parser import text_string_to_metric_families
out = []
for f in text_string_to_metric_families(sys.stdin.read()):
    out.append({"name": f.name, "type": f.type, "help": f.documentation, "unit": f.unit,
                "samples": [{"name": s.name, "labels": s.labels, "value": s.value}
                            for s in f.samples]})
print(json.dumps(out))
"#;
    let mut child = Command::new(prometheus_python())
        .args(["-c", SCRIPT, format])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the Prometheus parser");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the {format} parser refused the scrape: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// The value of the sample `name` whose labels include `labels`.
fn sample(families: &[Value], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    families
        .iter()
        .flat_map(|f| f["samples"].as_array().unwrap())
        .find(|s| s["name"] == name && labels.iter().all(|(k, v)| s["labels"][*k] == *v))
        .map(|s| s["value"].as_f64().unwrap())
}

/// Prometheus' naming rules, as its docs state them: a prefix, help for every family, counters
/// end in `_total`, durations are in seconds and say so.
fn assert_well_named(families: &[Value]) {
    assert!(!families.is_empty());
    for family in families {
        let name = family["name"].as_str().unwrap();
        assert!(name.starts_with("hotswap_"), "{family}");
        assert!(!family["help"].as_str().unwrap().is_empty(), "{family}");
        for s in family["samples"].as_array().unwrap() {
            let sample_name = s["name"].as_str().unwrap();
            match family["type"].as_str().unwrap() {
                "counter" => assert!(
                    sample_name.ends_with("_total") || sample_name.ends_with("_created"),
                    "{family}"
                ),
                "gauge" => assert!(!sample_name.ends_with("_total"), "{family}"),
                other => panic!("unexpected type {other}: {family}"),
            }
        }
        assert!(
            !name.contains("duration") || name.ends_with("_seconds"),
            "{family}"
        );
    }
}

#[test]
fn metrics_endpoint_serves_what_prometheus_parses() {
    let mut env = TestEnv::new("prometheus");
    std::fs::write(
        &env.config,
        config(&[("static", &["tcp 127.0.0.1/32 8081"])]),
    )
    .unwrap();
    env.daemon_args = vec!["--metrics-listen".into(), "127.0.0.1:9464".into()];
    env.start_daemon();
    let _static = serve(&env, "static");
    for _ in 0..3 {
        assert_eq!(tcp_request("127.0.0.1:8081").unwrap(), "static");
    }
    assert!(tcp_request("127.0.0.1:8081").is_ok());

    // A supervised service with one upgrade that succeeded and one that failed.
    let service = RunningService::fixture(&env, &[]);
    env.ok(&["upgrade", "web"]);
    env.fails(&["upgrade", "web", "--", "false"]);

    let (status, content_type, body) = scrape(9464, "/metrics", "text/plain");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    let families = parse("text", &body);
    assert_well_named(&families);
    let web = [("service", "web")];
    // The host's kernel has sk_lookup (the kernel counters are its maps').
    assert_eq!(env.status()["backend"]["name"], "sk_lookup");
    {
        let steered = sample(&families, "hotswap_steered_total", &[("service", "static")]);
        assert!(steered.unwrap() >= 4.0, "{body}");
        assert!(
            sample(&families, "hotswap_lookups_total", &[("service", "static")]).is_some(),
            "{body}"
        );
    }
    assert_eq!(
        sample(
            &families,
            "hotswap_service_bindings",
            &[("service", "static")]
        ),
        Some(1.0),
        "{body}"
    );
    assert_eq!(sample(&families, "hotswap_supervisor_up", &web), Some(1.0));
    for (outcome, count) in [("succeeded", 1.0), ("failed", 1.0), ("rolled_back", 0.0)] {
        assert_eq!(
            sample(
                &families,
                "hotswap_upgrades_total",
                &[("service", "web"), ("outcome", outcome)]
            ),
            Some(count),
            "{outcome}: {body}"
        );
    }
    assert_eq!(
        sample(
            &families,
            "hotswap_generations",
            &[("service", "web"), ("state", "active")]
        ),
        Some(1.0),
        "{body}"
    );
    let duration = sample(&families, "hotswap_last_upgrade_duration_seconds", &web);
    assert!(duration.is_some_and(|d| (0.0..60.0).contains(&d)), "{body}");
    assert_eq!(sample(&families, "hotswap_restarts_total", &web), Some(0.0));
    assert!(sample(&families, "hotswap_connections_handed_over_total", &web).is_some());

    // OpenMetrics for a scraper that asks for it: the same numbers, the unit declared.
    let (status, content_type, body) = scrape(
        9464,
        "/metrics",
        "application/openmetrics-text; version=1.0.0",
    );
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    let open = parse("openmetrics", &body);
    assert_well_named(&open);
    let unit = open
        .iter()
        .find(|f| f["name"] == "hotswap_last_upgrade_duration_seconds")
        .map(|f| f["unit"].clone());
    assert_eq!(unit, Some(Value::from("seconds")), "{body}");
    assert_eq!(
        sample(
            &open,
            "hotswap_upgrades_total",
            &[("service", "web"), ("outcome", "succeeded")]
        ),
        Some(1.0)
    );

    // Anything but /metrics (and / for a look by hand) is not found.
    let (status, _, _) = scrape(9464, "/nothing", "*/*");
    assert!(status.starts_with("HTTP/1.1 404"), "{status}");

    // A hung supervisor costs the scrape its deadline and shows as down, not absent.
    let supervisor = nix::unistd::Pid::from_raw(service.pid() as i32);
    nix::sys::signal::kill(supervisor, Signal::SIGSTOP).unwrap();
    let (status, _, body) = scrape(9464, "/metrics", "text/plain");
    nix::sys::signal::kill(supervisor, Signal::SIGCONT).unwrap();
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    let families = parse("text", &body);
    assert_eq!(
        sample(&families, "hotswap_supervisor_up", &web),
        Some(0.0),
        "{body}"
    );
    assert_eq!(
        sample(
            &families,
            "hotswap_service_bindings",
            &[("service", "static")]
        ),
        Some(1.0)
    );
}

#[test]
fn a_metrics_address_that_cannot_be_used_stops_the_start() {
    let mut env = TestEnv::new("prometheus-bad");
    let _taken = std::net::TcpListener::bind("127.0.0.1:9464").unwrap();
    env.daemon_args = vec!["--metrics-listen".into(), "127.0.0.1:9464".into()];
    let log = env.try_start_daemon().unwrap_err();
    assert!(log.contains("127.0.0.1:9464"), "{log}");
    let out = env.hotswap(&["daemon", "--metrics-listen", "not-an-address"]);
    assert!(!out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 1);
}

/// Whether `text` begins with an RFC 3339 timestamp (`2026-12-04T17:04:35…`), as tracing's
/// text lines do.
fn starts_with_timestamp(text: &str) -> bool {
    let b = text.as_bytes();
    b.len() > 11
        && b[..4].iter().all(u8::is_ascii_digit)
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
}

/// Whether `line` begins with a syslog priority, `<0>` to `<7>`.
fn has_priority(line: &str) -> bool {
    let bytes = line.as_bytes();
    bytes.len() > 3 && bytes[0] == b'<' && (b'0'..=b'7').contains(&bytes[1]) && bytes[2] == b'>'
}

#[test]
fn json_logs_are_one_object_per_line_for_daemon_and_supervisor() {
    let mut env = TestEnv::new("log-json");
    env.daemon_args = vec!["--log-format".into(), "json".into()];
    env.start_daemon();
    let mut service = RunningService::fixture(&env, &["--log-format", "json"]);
    env.ok(&["upgrade", "web"]);
    service.stop();
    env.stop_daemon(Signal::SIGTERM);
    for (who, log) in [("daemon", env.daemon_log()), ("supervisor", service.log())] {
        let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(lines.len() >= 2, "{who}: {log}");
        for line in lines {
            let object: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{who}: not JSON ({e}): {line}"));
            assert!(object["timestamp"].is_string(), "{who}: {line}");
            assert!(object["level"].is_string(), "{who}: {line}");
            assert!(object["fields"]["message"].is_string(), "{who}: {line}");
        }
    }
    assert!(
        service.log().contains("switched 1 -> 2"),
        "{}",
        service.log()
    );
}

/// Under systemd (standard error is the journal, as JOURNAL_STREAM says) lines carry the
/// journal's priority prefix and no timestamp of their own; a JOURNAL_STREAM inherited by a
/// process whose standard error is something else changes nothing.
#[test]
fn text_logs_suit_the_journal_when_stderr_is_the_journal() {
    use std::os::unix::fs::MetadataExt as _;
    let env = TestEnv::new("log-journal");
    let run_daemon = |journal_stream: Option<&str>, path: &std::path::Path| {
        let file = std::fs::File::create(path).unwrap();
        let meta = file.metadata().unwrap();
        let stream = journal_stream
            .map(str::to_owned)
            .unwrap_or_else(|| format!("{}:{}", meta.dev(), meta.ino()));
        let mut daemon = env
            .daemon_command()
            .env("JOURNAL_STREAM", stream)
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap();
        wait_until("the daemon answers", || {
            env.hotswap(&["status"]).status.success()
        });
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(daemon.id() as i32),
            Signal::SIGTERM,
        )
        .unwrap();
        daemon.wait().unwrap();
        std::fs::read_to_string(path).unwrap()
    };
    let journal = run_daemon(None, &env.dir.path().join("journal.log"));
    let lines: Vec<&str> = journal.lines().collect();
    assert!(!lines.is_empty());
    for line in &lines {
        assert!(has_priority(line), "{journal}");
        // No timestamp: the journal stamps lines itself.
        assert!(!starts_with_timestamp(line[3..].trim_start()), "{line}");
    }
    assert!(lines.iter().any(|l| l.starts_with("<6>")), "{journal}");

    let elsewhere = run_daemon(Some("1:1"), &env.dir.path().join("file.log"));
    assert!(!elsewhere.is_empty());
    assert!(!elsewhere.lines().any(has_priority), "{elsewhere}");
    assert!(
        elsewhere
            .lines()
            .all(|l| starts_with_timestamp(l.trim_start())),
        "{elsewhere}"
    );
}
