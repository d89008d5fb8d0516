//! `cargo xtask demo`: hotswap in one minute. In a private network namespace it starts the
//! daemon, runs the example server under `hotswap run`, keeps two clients busy (a new
//! connection per request, and keep-alive), upgrades twice, rolls back once, and prints who
//! served what and whether anything failed.

use std::{
    collections::BTreeMap,
    process::Stdio,
    time::{Duration, Instant},
};

use integration_tests::{example_server, hotswap_command, HttpLoad, RunningService, TestEnv};

fn main() {
    let hello = example_server().to_str().expect("utf-8 path").to_owned();
    println!("hotswap demo: a private network namespace, the daemon, and `hotswap run hello --listen tcp://127.0.0.1:8080 -- {hello}`");
    let env = TestEnv::with_daemon("demo");
    let service = RunningService::start(
        &env,
        "hello",
        &[
            "--listen",
            "tcp://127.0.0.1:8080",
            "--grace",
            "2s",
            "--",
            &hello,
        ],
    );
    let fresh = HttpLoad::start("127.0.0.1:8080", false, u64::MAX);
    let kept = HttpLoad::start("127.0.0.1:8080", true, u64::MAX);
    std::thread::sleep(Duration::from_secs(1));

    let mut steps: Vec<(String, String, Duration)> = Vec::new();
    let run = |steps: &mut Vec<(String, String, Duration)>, label: &str, args: &[&str]| {
        let started = Instant::now();
        let out = env.hotswap(args);
        let took = started.elapsed();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        for line in text.lines() {
            println!("  {line}");
        }
        let summary = text
            .lines()
            .last()
            .unwrap_or("")
            .trim_start_matches("hello: ")
            .to_owned();
        steps.push((label.to_owned(), summary, took));
    };

    println!("\n$ hotswap upgrade hello");
    run(&mut steps, "upgrade", &["upgrade", "hello"]);
    std::thread::sleep(Duration::from_secs(1));

    println!(
        "\n$ hotswap upgrade hello   (and, within its 2 s grace period, hotswap rollback hello)"
    );
    let second = hotswap_command(&env)
        .args(["upgrade", "hello"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("upgrade");
    let started = Instant::now();
    while env.status()["supervisors"]["hello"]["active"] != 3 {
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(500));
    run(&mut steps, "rollback", &["rollback", "hello"]);
    let out = second.wait_with_output().expect("upgrade");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    for line in text.lines() {
        println!("  {line}");
    }
    steps.insert(
        1,
        (
            "upgrade".to_owned(),
            text.lines()
                .last()
                .unwrap_or("")
                .trim_start_matches("hello: ")
                .to_owned(),
            started.elapsed(),
        ),
    );
    std::thread::sleep(Duration::from_secs(1));

    println!("\n$ hotswap upgrade hello");
    run(&mut steps, "upgrade", &["upgrade", "hello"]);
    std::thread::sleep(Duration::from_secs(1));
    let (fresh, kept) = (fresh.stop(), kept.stop());
    println!("\n$ hotswap status");
    print!("{}", env.ok(&["status"]));
    drop(service);

    let mut by_generation: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for (body, n) in &fresh.replies {
        by_generation.entry(body.clone()).or_default().0 += n;
    }
    for (body, n) in &kept.replies {
        by_generation.entry(body.clone()).or_default().1 += n;
    }
    println!(
        "\n{:<28} {:>22} {:>12}",
        "served by", "new conn per request", "keep-alive"
    );
    for (who, (f, k)) in &by_generation {
        println!("{who:<28} {f:>22} {k:>12}");
    }
    println!(
        "{:<28} {:>22} {:>12}",
        "failed connections", fresh.failed_connections, kept.failed_connections
    );
    println!(
        "{:<28} {:>22} {:>12}",
        "failed requests", fresh.failed, kept.failed
    );
    println!("\n{:<10} {:>8}  result", "step", "took");
    for (step, summary, took) in &steps {
        println!("{step:<10} {:>6} ms  {summary}", took.as_millis());
    }
    if fresh.failed + kept.failed > 0 {
        eprintln!(
            "demo: requests failed: {:?} {:?}",
            fresh.failures, kept.failures
        );
        std::process::exit(1);
    }
}
