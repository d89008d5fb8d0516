//! The supervisor's control socket: serving `upgrade`, `rollback` and `status`, and asking.

use super::*;

impl Supervisor {
    /// Serves one admitted connection: one request, waited for at most `idle`.
    pub(super) async fn serve_control(
        self: Arc<Self>,
        stream: UnixStream,
        idle: Duration,
    ) -> Result<(), FrameError> {
        let connection = Arc::new(tokio::sync::Mutex::new(Connection::with_max_frame(
            stream,
            crate::admission::MAX_REQUEST_FRAME,
        )));
        let received = tokio::time::timeout(idle, async {
            connection.lock().await.receive::<SupervisorRequest>().await
        })
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?;
        let request: SupervisorRequest = match received {
            Ok(r) => r,
            Err(err) => {
                let code = match err {
                    FrameError::VersionMismatch { .. } => {
                        crate::protocol::ErrorCode::VersionMismatch
                    }
                    _ => crate::protocol::ErrorCode::MalformedRequest,
                };
                let done = SupervisorMessage::Done {
                    ok: false,
                    message: format!("malformed request: {}", error_chain(&err)),
                    code: Some(code),
                };
                return connection.lock().await.send(&done).await;
            }
        };
        let (lines_tx, mut lines_rx) = mpsc::unbounded_channel::<String>();
        let progress = move |line: String| {
            tracing::info!("{line}");
            let _ = lines_tx.send(line);
        };
        let forward = {
            let connection = Arc::clone(&connection);
            async move {
                while let Some(line) = lines_rx.recv().await {
                    let _ = connection
                        .lock()
                        .await
                        .send(&SupervisorMessage::Progress { line })
                        .await;
                }
            }
        };
        let work = async {
            let result = match request {
                SupervisorRequest::Status => return Some(SupervisorMessage::Status(self.report())),
                SupervisorRequest::Upgrade {
                    command,
                    ready,
                    ready_timeout_ms,
                    pass_fds,
                } => {
                    let timeout = ready_timeout_ms.map(Duration::from_millis);
                    // The wire is bounded as the command line is.
                    let too_long =
                        timeout
                            .filter(|t| *t > spec::MAX_DURATION)
                            .or_else(|| match ready {
                                Some(ReadyMode::Delay(d)) if d > spec::MAX_DURATION => Some(d),
                                _ => None,
                            });
                    match too_long {
                        Some(d) => Err(SupervisorError::Spec(spec::SpecError::TooLong(
                            humantime::format_duration(d).to_string(),
                        ))),
                        None => {
                            self.upgrade(command, pass_fds, ready, timeout, &progress)
                                .await
                        }
                    }
                }
                SupervisorRequest::Rollback => self.rollback(&progress).await,
                SupervisorRequest::Reexec => match self.check_reexec() {
                    Ok(()) => {
                        let done = SupervisorMessage::Done {
                            ok: true,
                            code: None,
                            message: format!(
                                "re-executing {} (pid {})",
                                self.exec.binary().display(),
                                std::process::id()
                            ),
                        };
                        // The answer first: the exec closes this connection.
                        let _ = connection.lock().await.send(&done).await;
                        let Err(err) = self.reexec();
                        tracing::warn!("{}", error_chain(&err));
                        return None;
                    }
                    Err(err) => Err(err),
                },
            };
            drop(progress);
            Some(match result {
                Ok(message) => SupervisorMessage::Done {
                    ok: true,
                    message,
                    code: None,
                },
                Err(err) => {
                    tracing::warn!("{}", error_chain(&err));
                    SupervisorMessage::Done {
                        ok: false,
                        message: error_chain(&err),
                        code: Some(err.code()),
                    }
                }
            })
        };
        let (done, ()) = tokio::join!(work, forward);
        if let Some(done) = done {
            connection.lock().await.send(&done).await?;
        }
        Ok(())
    }
}

/// The services whose supervisor's control socket is in `run_dir` (none where it cannot be
/// read).
pub fn running_services(run_dir: &Path) -> Vec<ServiceName> {
    let Ok(entries) = std::fs::read_dir(run_dir) else {
        return Vec::new();
    };
    let mut names: Vec<ServiceName> = entries
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_suffix(".run.sock")?
                .parse()
                .ok()
        })
        .collect();
    names.sort();
    names
}

/// A service's supervisor's report, or why there is none within `deadline`.
pub async fn report(
    run_dir: &Path,
    service: &ServiceName,
    deadline: std::time::Duration,
) -> Result<SupervisorReport, SupervisorError> {
    let mut ignore = |_: &str| {};
    let asked = request(run_dir, service, &SupervisorRequest::Status, &mut ignore);
    match tokio::time::timeout(deadline, asked).await {
        Ok(Ok(SupervisorMessage::Status(report))) => Ok(report),
        Ok(Ok(_)) => Err(SupervisorError::UnexpectedAnswer),
        Ok(Err(err)) => Err(err),
        Err(_) => Err(SupervisorError::SupervisorTimeout(deadline)),
    }
}

/// Sends one request to a service's supervisor; progress lines go to `on_progress`. Returns the
/// final message, or the status report.
pub async fn request(
    run_dir: &Path,
    service: &ServiceName,
    request: &SupervisorRequest,
    on_progress: &mut (dyn FnMut(&str) + Send),
) -> Result<SupervisorMessage, SupervisorError> {
    let path = supervisor_socket(run_dir, service);
    let stream = UnixStream::connect(&path)
        .await
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                SupervisorError::NotRunning(service.clone())
            }
            _ => PathError::at("connecting to", &path)(e).into(),
        })?;
    let mut connection = Connection::new(stream);
    connection.send(request).await?;
    loop {
        match connection.receive::<SupervisorMessage>().await? {
            SupervisorMessage::Progress { line } => on_progress(&line),
            SupervisorMessage::Done {
                ok: false,
                message,
                code,
            } => {
                return Err(SupervisorError::Refused(crate::protocol::WireError {
                    // A supervisor of a build before codes.
                    code: code.unwrap_or(crate::protocol::ErrorCode::Failed),
                    message,
                }));
            }
            done => return Ok(done),
        }
    }
}
