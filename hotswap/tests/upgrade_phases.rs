//! The upgrade's phases and its one way out, against a fake daemon with paused time: every way
//! an upgrade can end leaves exactly one active generation that the daemon and `status` agree
//! on, and nothing of the new generation behind (process, keeper, registration). Needs no
//! privileges: the generations are `sleep`, their sockets are on 127.0.0.1, the daemon is a
//! task answering the control protocol with scripted faults.
//!
//! `harness = false`: this binary is also the keeper its supervisors start (`/proc/self/exe
//! keep …`), and the scenarios run one after another in one process, since a supervisor reaps
//! every exited child of its process.

use std::{
    collections::{BTreeMap, VecDeque},
    future::Future,
    path::PathBuf,
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use hotswap::{
    backend::{BackendInfo, Capabilities, SocketSource, Support},
    model::{Binding, ServiceName},
    protocol::{Connection, ErrorCode, Reply, Request, Response, WireError},
    registry::{GenerationStatus, ServiceStatus, StatusReport},
    supervisor::{
        self,
        spec::{FdPassing, ReadyMode},
        GenerationState, RunConfig, SupervisorError, SupervisorMessage, SupervisorReport,
        SupervisorRequest,
    },
};
use tokio::net::UnixListener;

/// What the fake daemon does with a `switch`.
#[derive(Clone, Copy, Debug)]
enum SwitchFault {
    /// Switches, then closes the connection without a reply (the reply is lost).
    ApplyThenLoseReply,
    /// Closes the connection without switching.
    LoseRequest,
    /// Never answers.
    Hang,
}

#[derive(Default)]
struct Fake {
    bindings: Vec<Binding>,
    /// Registered generations: id → the registering (keeper) pid.
    generations: BTreeMap<u32, u32>,
    next: u32,
    active: Option<u32>,
    switch_faults: VecDeque<SwitchFault>,
    /// Registers the next generation, then closes the connection without a reply.
    lose_register_reply: bool,
    forgotten: Vec<u32>,
}

fn service() -> ServiceName {
    "web".parse().unwrap()
}

fn status(fake: &Fake) -> StatusReport {
    StatusReport {
        backend: BackendInfo {
            name: "fake".into(),
            reason: "a test".into(),
            state_dir: String::new(),
            program_id: None,
            verified_instructions: None,
            adopted: false,
            capabilities: Capabilities {
                sockets: SocketSource::Own,
                socket_per_generation: true,
                switch: Support::Yes,
                probe: Support::Yes,
                metrics: Support::Yes,
                prefixes: Support::Yes,
                debug_log: Support::Yes,
            },
            unserved: Vec::new(),
        },
        services: vec![ServiceStatus {
            name: service(),
            id: 1,
            owner: Default::default(),
            bindings: fake.bindings.clone(),
            generations: fake
                .generations
                .iter()
                .map(|(&id, &pid)| GenerationStatus {
                    id,
                    pid,
                    sockets: Vec::new(),
                    label: None,
                    active: fake.active == Some(id),
                    registered_at: 0,
                })
                .collect(),
            relistened: 0,
        }],
    }
}

/// Answers one request; `None` closes the connection without an answer.
async fn answer(fake: &Mutex<Fake>, request: Request) -> Option<Response> {
    let hang = {
        let mut fake = fake.lock().unwrap();
        let response = match request {
            Request::Status => Ok(Reply::Status(status(&fake))),
            Request::Bind { binding, .. } => {
                fake.bindings.push(binding);
                Ok(Reply::Done)
            }
            Request::Register { pid, .. } => {
                fake.next += 1;
                let id = fake.next;
                fake.generations.insert(id, pid);
                if std::mem::take(&mut fake.lose_register_reply) {
                    return None;
                }
                Ok(Reply::Registered {
                    generation: id,
                    activated: false,
                })
            }
            Request::Switch { generation, .. } => match fake.switch_faults.pop_front() {
                Some(SwitchFault::ApplyThenLoseReply) => {
                    fake.active = Some(generation);
                    return None;
                }
                Some(SwitchFault::LoseRequest) => return None,
                Some(SwitchFault::Hang) => Err(None),
                None if !fake.generations.contains_key(&generation) => Err(Some(WireError {
                    code: ErrorCode::UnknownGeneration,
                    message: format!("no generation {generation}"),
                })),
                None => Ok(Reply::Switched {
                    previous: fake.active.replace(generation),
                }),
            },
            Request::Forget { generation, .. } => {
                fake.generations.remove(&generation);
                fake.forgotten.push(generation);
                if fake.active == Some(generation) {
                    fake.active = None;
                }
                Ok(Reply::Done)
            }
            other => Err(Some(WireError {
                code: ErrorCode::Unsupported,
                message: format!("the fake daemon does not do {other:?}"),
            })),
        };
        // `Err(None)`: hang.
        match response {
            Ok(reply) => Some(Ok(reply)),
            Err(Some(err)) => Some(Err(err)),
            Err(None) => None,
        }
    };
    match hang {
        Some(response) => Some(response),
        None => std::future::pending().await,
    }
}

async fn fake_daemon(listener: UnixListener, fake: Arc<Mutex<Fake>>) {
    while let Ok((stream, _)) = listener.accept().await {
        let fake = Arc::clone(&fake);
        tokio::spawn(async move {
            let mut connection = Connection::new(stream);
            let Ok(request) = connection.receive::<Request>().await else {
                return;
            };
            if let Some(response) = answer(&fake, request).await {
                let _ = connection.send(&response).await;
            }
        });
    }
}

struct Harness {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    fake: Arc<Mutex<Fake>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    _reexec: tokio::sync::mpsc::UnboundedSender<()>,
    run: tokio::task::JoinHandle<Result<(), SupervisorError>>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn upgrade_request(ready: Option<ReadyMode>, ready_timeout_ms: Option<u64>) -> SupervisorRequest {
    SupervisorRequest::Upgrade {
        command: None,
        ready,
        ready_timeout_ms,
        pass_fds: None,
    }
}

impl Harness {
    async fn start(grace: Duration, ready: Duration) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("hotswap.sock");
        let fake = Arc::new(Mutex::new(Fake::default()));
        tokio::spawn(fake_daemon(
            UnixListener::bind(&socket).unwrap(),
            Arc::clone(&fake),
        ));
        let config = RunConfig {
            service: service(),
            listens: vec![format!("tcp://127.0.0.1:{}", free_port()).parse().unwrap()],
            ready: Some(ReadyMode::Delay(ready)),
            ready_timeout: Duration::from_secs(5),
            drain_signal: nix::sys::signal::Signal::SIGTERM,
            drain_timeout: Duration::from_secs(2),
            drain_settle: Duration::from_millis(10),
            grace,
            // Nothing inherited that a leak (a failed scenario) would hold open; gone in 10 min.
            command: ["sh", "-c", "exec sleep 600 </dev/null >/dev/null 2>&1"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            fd_passing: FdPassing::Systemd,
            daemon_socket: socket.clone(),
            run_dir: socket.parent().unwrap().to_owned(),
            handoff: false,
        };
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let (reexec, reexec_requests) = tokio::sync::mpsc::unbounded_channel();
        let run = tokio::spawn(supervisor::run(
            config,
            async move {
                let _ = stopped.await;
            },
            reexec_requests,
        ));
        let harness = Self {
            _dir: dir,
            socket,
            fake,
            stop: Some(stop),
            _reexec: reexec,
            run,
        };
        for _ in 0..1000 {
            if let Ok(report) = harness.try_report().await {
                if report.active.is_some() {
                    return harness;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the first generation never became active");
    }

    async fn try_report(&self) -> Result<SupervisorReport, SupervisorError> {
        match supervisor::request(
            self.socket.parent().unwrap(),
            &service(),
            &SupervisorRequest::Status,
            &mut |_| {},
        )
        .await?
        {
            SupervisorMessage::Status(report) => Ok(report),
            other => panic!("{other:?}"),
        }
    }

    async fn report(&self) -> SupervisorReport {
        self.try_report().await.unwrap()
    }

    /// The supervisor's answer; a failure as its code and its message.
    async fn send(
        &self,
        request: SupervisorRequest,
    ) -> Result<String, (hotswap::protocol::ErrorCode, String)> {
        match supervisor::request(
            self.socket.parent().unwrap(),
            &service(),
            &request,
            &mut |_| {},
        )
        .await
        {
            Ok(SupervisorMessage::Done { message, .. }) => Ok(message),
            Ok(other) => panic!("{other:?}"),
            Err(err) => Err((err.code(), hotswap::error_chain(&err))),
        }
    }

    async fn upgrade(&self) -> Result<String, (hotswap::protocol::ErrorCode, String)> {
        self.send(upgrade_request(None, None)).await
    }

    /// The one consistent end: one active generation, the same for the daemon and `status`, no
    /// upgrade in flight, and every other generation retired, its process and keeper gone, its
    /// registration forgotten or left only with a dead keeper (which a real daemon reaps).
    async fn assert_one_active(&self, expected: u32, what: &str) {
        let report = self.report().await;
        let daemon_active = self.fake.lock().unwrap().active;
        assert_eq!(report.active, Some(expected), "{what}: {report:?}");
        assert_eq!(
            daemon_active,
            Some(expected),
            "{what}: the daemon steers elsewhere"
        );
        assert_eq!(report.upgrading, None, "{what}: {report:?}");
        assert_eq!(report.upgrade_phase, None, "{what}: {report:?}");
        for g in &report.generations {
            let live = matches!(
                g.state,
                GenerationState::Active | GenerationState::Ready | GenerationState::Starting
            );
            assert_eq!(
                live,
                g.id == expected,
                "{what}: generation {}: {report:?}",
                g.id
            );
            if g.id == expected {
                continue;
            }
            if let Some(keeper) = self.fake.lock().unwrap().generations.get(&g.id).copied() {
                wait_gone(keeper, what);
            }
            for pid in [g.pid, g.keeper].into_iter().flatten() {
                wait_gone(pid, what);
            }
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.run.await.unwrap().unwrap();
    }
}

/// Whether `pid` runs (a zombie does not).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// Waits, in real time (a killed process takes a moment to go), until `pid` no longer runs.
fn wait_gone(pid: u32, what: &str) {
    for _ in 0..500 {
        if !running(pid) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("{what}: pid {pid} still runs");
}

async fn a_plain_upgrade_ends_with_the_new_generation_alone() {
    let h = Harness::start(Duration::from_millis(50), Duration::from_millis(100)).await;
    let out = h.upgrade().await.unwrap();
    assert!(out.contains("generation 2 is active"), "{out}");
    h.assert_one_active(2, "plain upgrade").await;
    assert_eq!(h.fake.lock().unwrap().forgotten, vec![1]);
    h.stop().await;
}

async fn a_switch_whose_reply_is_lost_but_that_landed_is_kept() {
    let h = Harness::start(Duration::from_millis(50), Duration::from_millis(100)).await;
    h.fake
        .lock()
        .unwrap()
        .switch_faults
        .push_back(SwitchFault::ApplyThenLoseReply);
    let out = h.upgrade().await.unwrap();
    assert!(out.contains("generation 2 is active"), "{out}");
    h.assert_one_active(2, "reply lost, switch landed").await;
    h.stop().await;
}

async fn a_switch_that_never_reached_the_daemon_undoes_the_upgrade() {
    let h = Harness::start(Duration::from_millis(50), Duration::from_millis(100)).await;
    h.fake
        .lock()
        .unwrap()
        .switch_faults
        .push_back(SwitchFault::LoseRequest);
    let (code, err) = h.upgrade().await.unwrap_err();
    assert_eq!(code, ErrorCode::Failed, "{err}");
    assert!(err.contains("talking to the daemon failed"), "{err}");
    h.assert_one_active(1, "switch lost").await;
    assert_eq!(h.fake.lock().unwrap().forgotten, vec![2]);
    // And the next upgrade works.
    let out = h.upgrade().await.unwrap();
    assert!(out.contains("generation 3 is active"), "{out}");
    h.assert_one_active(3, "after a lost switch").await;
    h.stop().await;
}

async fn a_registration_whose_reply_is_lost_leaves_nothing_behind() {
    let h = Harness::start(Duration::from_millis(50), Duration::from_millis(100)).await;
    h.fake.lock().unwrap().lose_register_reply = true;
    let (code, err) = h.upgrade().await.unwrap_err();
    assert_eq!(code, ErrorCode::Failed, "{err}");
    assert!(err.contains("talking to the daemon failed"), "{err}");
    // The registration names the new keeper, which is gone: a real daemon's reaper drops it.
    let keeper = h.fake.lock().unwrap().generations.get(&2).copied();
    wait_gone(keeper.expect("registered"), "register reply lost");
    h.assert_one_active(1, "register reply lost").await;
    let out = h.upgrade().await.unwrap();
    assert!(out.contains("generation 3 is active"), "{out}");
    h.stop().await;
}

async fn a_daemon_that_never_answers_fails_the_step_at_its_deadline() {
    let h = Harness::start(Duration::from_millis(50), Duration::from_millis(100)).await;
    h.fake
        .lock()
        .unwrap()
        .switch_faults
        .push_back(SwitchFault::Hang);
    let started = tokio::time::Instant::now();
    let (code, err) = h.upgrade().await.unwrap_err();
    assert_eq!(code, ErrorCode::Failed, "{err}");
    assert!(err.contains("did not answer within 10s"), "{err}");
    // Paused time: the deadline passed on the clock, not on the wall.
    assert!(started.elapsed() >= Duration::from_secs(10));
    h.assert_one_active(1, "daemon silent").await;
    h.stop().await;
}

async fn a_generation_not_ready_in_time_is_undone() {
    let h = Harness::start(Duration::from_millis(50), Duration::from_millis(100)).await;
    let request = upgrade_request(Some(ReadyMode::Delay(Duration::from_secs(10))), Some(5_000));
    let (code, err) = h.send(request).await.unwrap_err();
    assert_eq!(code, ErrorCode::NotReady, "{err}");
    assert!(err.contains("not ready after 5s"), "{err}");
    h.assert_one_active(1, "not ready").await;
    assert_eq!(h.fake.lock().unwrap().forgotten, vec![2]);
    h.stop().await;
}

async fn a_new_generation_that_dies_in_its_grace_period_is_rolled_back() {
    // A grace period far longer than the real moment the killed process takes to go: paused
    // time races ahead while nothing is ready.
    let h = Harness::start(Duration::from_secs(3600), Duration::from_millis(100)).await;
    let socket = h.socket.clone();
    // A local task: the progress callback is not Send.
    let upgrade = tokio::task::spawn_local(async move {
        supervisor::request(
            socket.parent().unwrap(),
            &service(),
            &upgrade_request(None, None),
            &mut |_| {},
        )
        .await
        .map(|_| ())
        .map_err(|e| (e.code(), e.to_string()))
    });
    let mut pid = None;
    for _ in 0..1000 {
        let report = h.report().await;
        if report.active == Some(2) && report.upgrade_phase.as_deref() == Some("grace") {
            pid = report
                .generations
                .iter()
                .find(|g| g.id == 2)
                .and_then(|g| g.pid);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let pid = pid.expect("never in the grace period");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let (code, err) = upgrade.await.unwrap().unwrap_err();
    assert_eq!(code, ErrorCode::RolledBack, "{err}");
    assert!(err.contains("rolled back to generation 1"), "{err}");
    h.assert_one_active(1, "died in grace").await;
    h.stop().await;
}

async fn stopping_during_readiness_undoes_the_upgrade_within_the_drain_timeout() {
    let h = Harness::start(Duration::from_millis(50), Duration::from_millis(100)).await;
    let socket = h.socket.clone();
    // A local task: the progress callback is not Send.
    let upgrade = tokio::task::spawn_local(async move {
        let request = upgrade_request(
            Some(ReadyMode::Delay(Duration::from_secs(60))),
            Some(120_000),
        );
        supervisor::request(socket.parent().unwrap(), &service(), &request, &mut |_| {})
            .await
            .map(|_| ())
            .map_err(|e| (e.code(), e.to_string()))
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let report = h.report().await;
    assert_eq!(
        report.upgrade_phase.as_deref(),
        Some("starting"),
        "{report:?}"
    );
    let started = tokio::time::Instant::now();
    let fake = Arc::clone(&h.fake);
    h.stop().await;
    // The drain timeout (2 s) and the deadlines, not the 60 s of readiness.
    assert!(
        started.elapsed() < Duration::from_secs(2 + 20),
        "{:?}",
        started.elapsed()
    );
    let (code, err) = upgrade.await.unwrap().unwrap_err();
    assert_eq!(code, ErrorCode::Stopping, "{err}");
    assert!(err.contains("stopping"), "{err}");
    let fake = fake.lock().unwrap();
    assert!(
        fake.generations.is_empty(),
        "left registered: {:?}",
        fake.generations
    );
}

type Scenario = fn() -> Pin<Box<dyn Future<Output = ()>>>;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("keep") {
        supervisor::keep();
    }
    let scenarios: [(&str, Scenario); 8] = [
        ("a_plain_upgrade_ends_with_the_new_generation_alone", || {
            Box::pin(a_plain_upgrade_ends_with_the_new_generation_alone())
        }),
        (
            "a_switch_whose_reply_is_lost_but_that_landed_is_kept",
            || Box::pin(a_switch_whose_reply_is_lost_but_that_landed_is_kept()),
        ),
        (
            "a_switch_that_never_reached_the_daemon_undoes_the_upgrade",
            || Box::pin(a_switch_that_never_reached_the_daemon_undoes_the_upgrade()),
        ),
        (
            "a_registration_whose_reply_is_lost_leaves_nothing_behind",
            || Box::pin(a_registration_whose_reply_is_lost_leaves_nothing_behind()),
        ),
        (
            "a_daemon_that_never_answers_fails_the_step_at_its_deadline",
            || Box::pin(a_daemon_that_never_answers_fails_the_step_at_its_deadline()),
        ),
        ("a_generation_not_ready_in_time_is_undone", || {
            Box::pin(a_generation_not_ready_in_time_is_undone())
        }),
        (
            "a_new_generation_that_dies_in_its_grace_period_is_rolled_back",
            || Box::pin(a_new_generation_that_dies_in_its_grace_period_is_rolled_back()),
        ),
        (
            "stopping_during_readiness_undoes_the_upgrade_within_the_drain_timeout",
            || Box::pin(stopping_during_readiness_undoes_the_upgrade_within_the_drain_timeout()),
        ),
    ];
    // RUST_LOG=info shows what the supervisors do.
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .init();
    }
    // `cargo test -- NAME` runs the scenarios whose name holds NAME.
    let filter = args.iter().skip(1).find(|a| !a.starts_with('-'));
    let mut ran = 0;
    for (name, scenario) in scenarios {
        if filter.is_some_and(|f| !name.contains(f.as_str())) {
            continue;
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        runtime.block_on(tokio::task::LocalSet::new().run_until(scenario()));
        println!("test {name} ... ok");
        ran += 1;
    }
    println!("test result: ok. {ran} passed; 0 failed; 0 ignored; 0 measured; 0 filtered out");
}
