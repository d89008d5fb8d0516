//! `cargo xtask`: make a fresh machine ready, then build and run hotswap.
//!
//! Every step is idempotent: a second run checks, finds everything in place and installs
//! nothing.

mod dist;
mod ebpf_object;
mod kernels;
mod kube;
mod lint;
mod setup;

use std::process::{Command, ExitCode};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install what building needs: nightly rust-src, bpf-linker; mount bpffs.
    Setup,
    /// Set up, build, and run `hotswap daemon` in the foreground (extra arguments go to it).
    Run {
        /// Arguments for `hotswap daemon`, e.g. `-- --debug-ebpf`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, build, and show hotswap at work: two upgrades and a rollback under load, in a
    /// private network namespace.
    Demo,
    /// Set up, build, and measure hotswap side by side (see BENCHMARKS.md).
    Bench {
        /// A shorter run (under 2 minutes) with fewer rounds and upgrades.
        #[arg(long)]
        quick: bool,
        /// Also write the figures as JSON to this file.
        #[arg(long, value_name = "PATH")]
        json: Option<std::path::PathBuf>,
        /// Run only these sections (comma-separated); the table and JSON hold just them.
        #[arg(long, value_delimiter = ',', value_name = "SECTION",
              value_parser = ["path", "switch", "upgrades", "peers", "scale"])]
        only: Vec<String>,
    },
    /// Set up, build, and run every test: unit tests and the privileged integration tests on
    /// this host's kernel, then the kernel matrix (a subset in a VM per kernel of
    /// xtask/src/kernels.rs). With a test name filter only the host suite runs.
    Test {
        /// Skip the kernel matrix.
        #[arg(long)]
        no_kernels: bool,
        /// Arguments for the test binaries, e.g. a test name filter.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build the release binary, shell completions, man pages and a .deb into
    /// TARGET_DIR/dist/ (prints the .deb's path).
    Dist,
    /// The style checks CI runs before the tests: `cargo fmt --check`, clippy with warnings
    /// as errors, the docs without warnings, and a build with the prebuilt eBPF object.
    Lint,
    /// Build the eBPF program from source and renew the prebuilt object
    /// (hotswap/ebpf-prebuilt/) that `HOTSWAP_EBPF=prebuilt` builds embed.
    EbpfObject,
    /// Set up, build, and run only the kernel matrix (all kernels, or those named).
    Kernels {
        /// Kernel names from xtask/src/kernels.rs.
        names: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Task::Setup => setup::ensure_all(),
        Task::Run { args } => run(args),
        Task::Test { no_kernels, args } => test(no_kernels, args),
        Task::Kernels { names } => kernel_matrix(names),
        Task::Dist => dist::run().map(drop),
        Task::Lint => lint::run(),
        Task::EbpfObject => ebpf_object::run(),
        Task::Demo => demo(),
        Task::Bench { quick, json, only } => bench(quick, json, only),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a command and fails with its description when it fails.
pub(crate) fn status(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// The workspace's root directory.
pub(crate) fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} needs root (loading eBPF programs and making network namespaces): run `sudo -E cargo xtask ...`");
    }
    Ok(())
}

fn build() -> Result<()> {
    status(cargo().args(["build", "--package", "hotswap", "--bins", "--examples"]))
}

fn run(args: Vec<String>) -> Result<()> {
    setup::ensure_all()?;
    require_root("hotswap daemon")?;
    build()?;
    let mut daemon = cargo();
    daemon.args([
        "run",
        "--quiet",
        "--package",
        "hotswap",
        "--bin",
        "hotswap",
        "--",
        "daemon",
    ]);
    daemon.args(args);
    status(&mut daemon)
}

fn demo() -> Result<()> {
    setup::ensure_all()?;
    require_root("the demo")?;
    build()?;
    status(cargo().args([
        "run",
        "--quiet",
        "--package",
        "integration-tests",
        "--bin",
        "hotswap-demo",
    ]))
}

fn bench(quick: bool, json: Option<std::path::PathBuf>, only: Vec<String>) -> Result<()> {
    setup::ensure_all()?;
    require_root("the bench")?;
    setup::ensure_debian_packages(setup::BENCH_PEERS)?;
    // Measure optimised code: the daemon, the CLI, the servers and the load generator.
    status(cargo().args([
        "build",
        "--release",
        "--package",
        "hotswap",
        "--package",
        "integration-tests",
        "--bins",
        "--examples",
    ]))?;
    let mut bench = cargo();
    bench.args([
        "run",
        "--quiet",
        "--release",
        "--package",
        "integration-tests",
        "--bin",
        "hotswap-bench",
        "--",
    ]);
    if quick {
        bench.arg("--quick");
    }
    if !only.is_empty() {
        bench.arg("--only").arg(only.join(","));
    }
    if let Some(json) = json {
        // The bench runs from the workspace root; keep the caller's relative path meaning.
        let json = std::env::current_dir()?.join(json);
        bench.arg("--json").arg(json);
    }
    status(&mut bench)
}

fn test(no_kernels: bool, args: Vec<String>) -> Result<()> {
    setup::ensure_all()?;
    require_root("the integration tests")?;
    // The bench's smoke test drives nginx and HAProxy too; the server tests run them and more.
    setup::ensure_debian_packages(setup::BENCH_PEERS)?;
    setup::ensure_debian_packages(setup::TESTED_SERVERS)?;
    setup::ensure_debian_packages(setup::DIST_TOOLS)?;
    // tests/tests/dist.rs takes the package apart: build it (release) first.
    let deb = dist::run()?;
    // The integration tests run the hotswap binary; build it first.
    build()?;
    let mut test = cargo();
    test.env("HOTSWAP_DEB", &deb);
    // tests/tests/kubernetes.rs checks deploy/kubernetes/ with it.
    test.env("HOTSWAP_KUBE_VALIDATE", kube::ensure_validator()?);
    // tests/tests/operations.rs parses the metrics endpoint with it.
    test.env(
        "HOTSWAP_PROMETHEUS_PYTHON",
        setup::ensure_prometheus_parser()?,
    );
    test.args(["test", "--workspace", "--exclude", "hotswap-ebpf", "--"]);
    let filtered = !args.is_empty();
    test.args(args);
    let mut summary = Summary::default();
    let host = run_tests_with_summary(&mut test, &mut summary);
    let matrix = if no_kernels || filtered {
        Ok(())
    } else {
        kernels::run(&[], &mut summary)
    };
    summary.finish(host.and(matrix))
}

fn kernel_matrix(names: Vec<String>) -> Result<()> {
    setup::ensure_all()?;
    require_root("the kernel matrix")?;
    build()?;
    let mut summary = Summary::default();
    let result = kernels::run(&names, &mut summary);
    summary.finish(result)
}

/// Test results summed over every test binary (cargo's own last line is that of whichever
/// binary ran last, often one with none) and every kernel.
#[derive(Debug, Default)]
pub(crate) struct Summary {
    passed: u64,
    failed: u64,
    /// Test binaries that ended without a result for every test they were to run.
    broken: u64,
}

impl Summary {
    /// Counts a libtest `test result:` line; other lines are ignored.
    fn feed(&mut self, line: &str) {
        let Some(result) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in result.split(['.', ';']) {
            let mut words = part.split_whitespace();
            match (words.next().map(str::parse::<u64>), words.next()) {
                (Some(Ok(n)), Some("passed")) => self.passed += n,
                (Some(Ok(n)), Some("failed")) => self.failed += n,
                _ => {}
            }
        }
    }

    fn add(&mut self, other: &Summary) {
        self.passed += other.passed;
        self.failed += other.failed;
        self.broken += other.broken;
    }

    /// Prints the one summary line and decides the outcome.
    fn finish(self, result: Result<()>) -> Result<()> {
        println!(
            "summary: {} passed, {} failed",
            self.passed,
            self.failed + self.broken
        );
        result?;
        if self.failed + self.broken > 0 {
            bail!("{} tests failed", self.failed + self.broken);
        }
        if self.passed == 0 {
            bail!("no test ran");
        }
        Ok(())
    }
}

/// Runs cargo test, echoing its output and adding its results to `summary`.
fn run_tests_with_summary(test: &mut Command, summary: &mut Summary) -> Result<()> {
    use std::io::BufRead as _;
    let mut child = test
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {test:?}"))?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.context("reading cargo test output")?;
        println!("{line}");
        summary.feed(&line);
    }
    let status = child.wait().context("waiting for cargo test")?;
    if !status.success() {
        bail!("{test:?} failed: {status}");
    }
    Ok(())
}
