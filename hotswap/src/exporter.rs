//! `hotswap daemon --metrics-listen`: the Prometheus endpoint.
//!
//! Every scrape reads the state afresh — the registry (bindings, generations, the kernel's
//! counters where the backend keeps them) and the report of each supervisor in root's run
//! directory — into a [`Scrape`], which [`render`] turns into the Prometheus text format (or
//! OpenMetrics, when the scraper asks for it). Nothing is kept between scrapes, so there is
//! no second copy of the state to go stale.

use std::{
    collections::BTreeMap,
    future::Future,
    net::SocketAddr,
    sync::{atomic::AtomicU64, Arc},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, header, server::conn::http1, Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{
    encoding::{prometheus_text, text as openmetrics_text},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::{Registry, Unit},
};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    admission::AcceptBackoff,
    registry::{ServiceMetricsReport, StatusReport},
    supervisor::{GenerationState, SupervisorReport},
};

/// Scrapes served at once; more wait in the listen queue.
const MAX_SCRAPES: usize = 16;

/// A scraper that sends no complete request head for this long is dropped.
const HEADER_DEADLINE: Duration = Duration::from_secs(5);

/// However a scraper behaves, its connection ends after this long.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// How long one supervisor may take to answer a scrape.
pub const SUPERVISOR_DEADLINE: Duration = Duration::from_secs(1);

/// What one scrape read.
#[derive(Clone, Debug)]
pub struct Scrape {
    /// The registry's view: backend, services, bindings, generations.
    pub status: StatusReport,
    /// The kernel's per-service counters, where the backend keeps them.
    pub kernel: Option<Vec<ServiceMetricsReport>>,
    /// Each supervisor in root's run directory, by service: its report, or `None` when it did
    /// not answer.
    pub supervisors: BTreeMap<String, Option<SupervisorReport>>,
}

/// Where scrapes come from (the daemon's registry and supervisors; a fixed one in tests).
pub trait Source: Clone + Send + Sync + 'static {
    /// Reads the state now.
    fn scrape(&self) -> impl Future<Output = Scrape> + Send;
}

/// The exposition format a scraper gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Prometheus' text format 0.0.4: what Prometheus has always read.
    Prometheus,
    /// OpenMetrics 1.0 text, for scrapers that ask for it in `Accept`.
    OpenMetrics,
}

impl Format {
    /// The format an `Accept` header asks for.
    pub fn from_accept(accept: Option<&str>) -> Self {
        match accept {
            Some(accept) if accept.contains("application/openmetrics-text") => Self::OpenMetrics,
            _ => Self::Prometheus,
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            Self::Prometheus => prometheus_text::CONTENT_TYPE,
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

type Labels = Vec<(&'static str, String)>;

fn service(name: &str) -> Labels {
    vec![("service", name.to_owned())]
}

/// A per-service counter family, registered under `name` (`_total` is added).
fn counter(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, Counter> {
    let family = Family::<Labels, Counter>::default();
    registry.register(name, help, family.clone());
    family
}

fn gauge(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, Gauge> {
    let family = Family::<Labels, Gauge>::default();
    registry.register(name, help, family.clone());
    family
}

/// Sets a counter that starts at zero in this scrape's registry to `value`.
fn set(family: &Family<Labels, Counter>, labels: Labels, value: u64) {
    family.get_or_create(&labels).inc_by(value);
}

fn gauge_value(value: impl TryInto<i64>) -> i64 {
    value.try_into().unwrap_or(i64::MAX)
}

/// The live states a supervisor's generation can be in, as the `state` label spells them.
const LIVE_STATES: [&str; 4] = ["starting", "ready", "active", "draining"];

fn state_label(state: &GenerationState) -> Option<&'static str> {
    match state {
        GenerationState::Starting => Some("starting"),
        GenerationState::Ready => Some("ready"),
        GenerationState::Active => Some("active"),
        GenerationState::Draining => Some("draining"),
        GenerationState::Exited { .. } | GenerationState::Failed { .. } => None,
    }
}

/// The registry that one scrape renders: every metric hotswap exports, with its help.
fn registry_of(scrape: &Scrape) -> Registry {
    let mut registry = Registry::with_prefix("hotswap");

    let backend = gauge(
        &mut registry,
        "backend_info",
        "The backend the daemon steers with (always 1; the backend is the label)",
    );
    backend
        .get_or_create(&vec![("backend", scrape.status.backend.name.to_string())])
        .set(1);

    let bindings = gauge(
        &mut registry,
        "service_bindings",
        "Addresses steered to the service",
    );
    let generations = gauge(
        &mut registry,
        "service_generations",
        "Generations of the service registered with the daemon (with a socket)",
    );
    let relistened = counter(
        &mut registry,
        "service_relistened",
        "Times the daemon found a socket of the service shut down and made it listen again, since it started",
    );
    for s in &scrape.status.services {
        bindings
            .get_or_create(&service(s.name.as_str()))
            .set(gauge_value(s.bindings.len()));
        generations
            .get_or_create(&service(s.name.as_str()))
            .set(gauge_value(s.generations.len()));
        set(&relistened, service(s.name.as_str()), s.relistened);
    }

    if let Some(kernel) = &scrape.kernel {
        let lookups = counter(
            &mut registry,
            "lookups",
            "New connections and datagrams whose socket lookup matched a binding of the service (kernel counter)",
        );
        let steered = counter(
            &mut registry,
            "steered",
            "Lookups handed to the service's active socket (kernel counter)",
        );
        let no_socket = counter(
            &mut registry,
            "no_socket",
            "Lookups refused because the service had no active socket (kernel counter)",
        );
        let errors = counter(
            &mut registry,
            "steering_errors",
            "Lookups refused because assigning the active socket failed (kernel counter)",
        );
        for m in kernel {
            let name = m.service.as_str();
            set(&lookups, service(name), m.lookups);
            set(&steered, service(name), m.steered);
            set(&no_socket, service(name), m.no_socket);
            set(&errors, service(name), m.errors);
        }
    }

    let up = gauge(
        &mut registry,
        "supervisor_up",
        "Whether the service's supervisor (hotswap run) answered this scrape",
    );
    let upgrades = counter(
        &mut registry,
        "upgrades",
        "Upgrades that ended, by outcome: succeeded, rolled_back (active, then rolled back), failed (never active)",
    );
    let restarts = counter(
        &mut registry,
        "restarts",
        "Generations the supervisor restarted after they died on their own",
    );
    let by_state = gauge(
        &mut registry,
        "generations",
        "The supervisor's live generations, by state",
    );
    let handed_over = counter(
        &mut registry,
        "connections_handed_over",
        "Established connections handed from one generation to a later one (--handoff), since the supervisor started",
    );
    let last_upgrade = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    registry.register_with_unit(
        "last_upgrade_duration",
        "How long the last upgrade that ended took, from its start to its end",
        Unit::Seconds,
        last_upgrade.clone(),
    );
    for (name, report) in &scrape.supervisors {
        up.get_or_create(&service(name))
            .set(i64::from(report.is_some()));
        let Some(report) = report else { continue };
        let outcomes = [
            ("succeeded", report.upgrades.succeeded),
            ("rolled_back", report.upgrades.rolled_back),
            ("failed", report.upgrades.failed),
        ];
        for (outcome, count) in outcomes {
            let mut labels = service(name);
            labels.push(("outcome", outcome.to_owned()));
            set(&upgrades, labels, count);
        }
        set(&restarts, service(name), u64::from(report.restarts));
        set(&handed_over, service(name), report.handed_over);
        let mut counts: BTreeMap<&str, i64> = LIVE_STATES.iter().map(|s| (*s, 0)).collect();
        for g in &report.generations {
            if let Some(state) = state_label(&g.state) {
                *counts.entry(state).or_default() += 1;
            }
        }
        for (state, count) in counts {
            let mut labels = service(name);
            labels.push(("state", state.to_owned()));
            by_state.get_or_create(&labels).set(count);
        }
        if let Some(ms) = report.last_upgrade_ms {
            last_upgrade
                .get_or_create(&service(name))
                .set(Duration::from_millis(ms).as_secs_f64());
        }
    }
    registry
}

/// One scrape in `format`.
pub fn render(scrape: &Scrape, format: Format) -> String {
    let registry = registry_of(scrape);
    let mut text = String::new();
    // Writing to a String cannot fail; the encoders fail only with their writer.
    let _ = match format {
        Format::Prometheus => prometheus_text::encode(&mut text, &registry),
        Format::OpenMetrics => openmetrics_text::encode(&mut text, &registry),
    };
    text
}

/// Serves scrapes of `source` on `listener` until `stop`: `GET /metrics` (and `/`), at most
/// `MAX_SCRAPES` at once, each connection closed after `CONNECTION_LIFETIME`.
pub async fn serve<S: Source>(listener: TcpListener, source: S, stop: CancellationToken) {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPES));
    let connections = TaskTracker::new();
    let mut backoff = AcceptBackoff::new("metrics connection");
    loop {
        let permit = tokio::select! {
            () = stop.cancelled() => break,
            permit = Arc::clone(&permits).acquire_owned() => permit,
        };
        let Ok(permit) = permit else { break };
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            accepted = async { backoff.ready().await; listener.accept().await } => accepted,
        };
        let Some(stream) = backoff.accepted(accepted) else {
            continue;
        };
        let source = source.clone();
        let stop = stop.clone();
        connections.spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |request| {
                let source = source.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(request, &source).await) }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_DEADLINE)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                served = connection => {
                    if let Err(err) = served {
                        tracing::debug!("metrics connection: {err}");
                    }
                }
                () = tokio::time::sleep(CONNECTION_LIFETIME) => {}
                () = stop.cancelled() => {}
            }
        });
    }
    connections.close();
    connections.wait().await;
}

async fn answer<S: Source>(request: Request<Incoming>, source: &S) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &str, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        if let Ok(value) = header::HeaderValue::from_str(content_type) {
            response.headers_mut().insert(header::CONTENT_TYPE, value);
        }
        response
    };
    let text = "text/plain; charset=utf-8";
    if !matches!(request.uri().path(), "/metrics" | "/") {
        return reply(
            StatusCode::NOT_FOUND,
            text,
            "not found: try /metrics\n".into(),
        );
    }
    if !matches!(*request.method(), Method::GET | Method::HEAD) {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            text,
            "only GET and HEAD\n".into(),
        );
    }
    let format = Format::from_accept(
        request
            .headers()
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok()),
    );
    let scrape = source.scrape().await;
    reply(
        StatusCode::OK,
        format.content_type(),
        render(&scrape, format),
    )
}

/// Binds the metrics listener, so a bad `--metrics-listen` fails the daemon's start.
pub fn bind(address: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = crate::socket::bound_socket(address, crate::model::Protocol::Tcp, false, false)?;
    let listener = std::net::TcpListener::from(socket);
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}
