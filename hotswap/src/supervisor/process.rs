//! Starting a generation's process with systemd socket activation: its sockets at fds 3, 4, …,
//! `LISTEN_FDS`, `LISTEN_FDNAMES`, and `LISTEN_PID` equal to its own pid.
//!
//! `LISTEN_PID` can only be known after fork; setting an environment variable there would
//! allocate, which is not safe in a forked child of a threaded process. So the whole
//! environment is prepared before the fork with room for the pid's digits, and the child
//! writes them in and calls `execve` itself.

use std::{
    ffi::{CString, OsStr, OsString},
    io,
    os::{
        fd::{AsRawFd as _, BorrowedFd, RawFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

use super::spec::FdPassing;
use crate::model::Protocol;

/// Starting a process failed.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// Nothing to run.
    #[error("no command given")]
    NoCommand,
    /// The program is not on `PATH` or not executable.
    #[error("command not found: {0}")]
    NotFound(String),
    /// A word of the command or environment has a NUL byte.
    #[error("the command or its environment contains a NUL byte")]
    Nul,
    /// fork/exec failed.
    #[error("starting {program} failed")]
    Spawn {
        /// The program.
        program: String,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// The first fd of socket activation (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Finds `program` the way a shell would: as a path if it has a slash, else on `PATH`.
pub fn resolve_program(program: &str) -> Result<PathBuf, SpawnError> {
    if program.contains('/') {
        let path = PathBuf::from(program);
        return if is_executable(&path) {
            Ok(path)
        } else {
            Err(SpawnError::NotFound(program.to_owned()))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| OsString::from("/usr/bin:/bin"));
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| SpawnError::NotFound(program.to_owned()))
}

fn cstring(bytes: &[u8]) -> Result<CString, SpawnError> {
    CString::new(bytes).map_err(|_| SpawnError::Nul)
}

/// Everything the forked child needs, prepared before the fork.
struct ExecPlan {
    program: CString,
    /// Keep the strings alive for the pointers below.
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    _env: Vec<CString>,
    /// `LISTEN_PID=` followed by room for the digits and a NUL.
    listen_pid: Vec<u8>,
    env_ptrs: Vec<*const libc::c_char>,
    /// What goes to fds 3, 4, … in order.
    fds: Vec<RawFd>,
    /// How the child leaves the supervisor's process group.
    detach: Detach,
}

/// How a child leaves the supervisor's process group and session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Detach {
    /// A process group of its own: a generation is its whole process tree, ended at once
    /// (killpg) when it retires.
    Group,
    /// A session of its own (a keeper): no signal meant for the supervisor's terminal or
    /// group reaches it.
    Session,
}

// SAFETY: the raw pointers point into buffers owned by the plan itself; the plan moves into the
// pre_exec closure whole and is only used in the forked child.
unsafe impl Send for ExecPlan {}
// SAFETY: as above; nothing is shared between threads through it.
unsafe impl Sync for ExecPlan {}

const LISTEN_PID_PREFIX: &[u8] = b"LISTEN_PID=";

impl ExecPlan {
    /// Runs in the forked child: moves the fds to 3, 4, …, fills in LISTEN_PID, execs.
    /// Only async-signal-safe calls.
    fn exec(&mut self) -> io::Error {
        let count = self.fds.len() as RawFd;
        // SAFETY: fd juggling and execve on buffers the plan owns.
        unsafe {
            // First out of the target range, so no source is overwritten by another's target.
            for i in 0..self.fds.len() {
                let high = libc::fcntl(self.fds[i], libc::F_DUPFD, LISTEN_FDS_START + count);
                if high < 0 {
                    return io::Error::last_os_error();
                }
                self.fds[i] = high;
            }
            for (i, &fd) in self.fds.iter().enumerate() {
                // dup2 clears FD_CLOEXEC on the new fd: exactly these survive the exec.
                if libc::dup2(fd, LISTEN_FDS_START + i as RawFd) < 0 {
                    return io::Error::last_os_error();
                }
                libc::close(fd);
            }
            // No PR_SET_PDEATHSIG: a generation outlives its supervisor (a crash, kill -9, a
            // re-exec), and the next supervisor adopts it.
            match self.detach {
                Detach::Group => libc::setpgid(0, 0),
                Detach::Session => libc::setsid(),
            };
            if self.listen_pid.len() < LISTEN_PID_PREFIX.len() + 11 {
                // No LISTEN_PID to fill in (a keeper).
                libc::execve(
                    self.program.as_ptr(),
                    self.argv_ptrs.as_ptr(),
                    self.env_ptrs.as_ptr(),
                );
                return io::Error::last_os_error();
            }
            let mut pid = libc::getpid() as u32;
            let mut digits = [0u8; 10];
            let mut n = 0;
            loop {
                digits[n] = b'0' + (pid % 10) as u8;
                n += 1;
                pid /= 10;
                if pid == 0 {
                    break;
                }
            }
            let start = LISTEN_PID_PREFIX.len();
            for i in 0..n {
                self.listen_pid[start + i] = digits[n - 1 - i];
            }
            self.listen_pid[start + n] = 0;
            libc::execve(
                self.program.as_ptr(),
                self.argv_ptrs.as_ptr(),
                self.env_ptrs.as_ptr(),
            );
            io::Error::last_os_error()
        }
    }
}

/// Variables a generation's process gets from hotswap, never from the supervisor's own
/// environment.
const HANDED_OVER: &[&str] = &[
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "NGINX",
    "HOTSWAP_FD_TCP",
    "HOTSWAP_FD_UDP",
    crate::handoff::HANDOFF_FD_VAR,
    super::LOCK_FD_VARIABLE,
];

/// The fd number each protocol's socket gets in the child: 3, 4, … in the order given.
fn fd_numbers(sockets: &[(Protocol, BorrowedFd<'_>)]) -> Vec<(Protocol, RawFd)> {
    sockets
        .iter()
        .enumerate()
        .map(|(i, (p, _))| (*p, LISTEN_FDS_START + i as RawFd))
        .collect()
}

/// `{fd:tcp}` and `{fd:udp}` in an argument become the socket's fd number in the child.
fn expand_fds(arg: &str, numbers: &[(Protocol, RawFd)]) -> String {
    numbers.iter().fold(arg.to_owned(), |arg, (protocol, fd)| {
        arg.replace(&format!("{{fd:{protocol}}}"), &fd.to_string())
    })
}

/// Starts `command` with `sockets` at fds 3, 4, …, told to it as `passing` says (systemd's
/// socket activation names each after its protocol), its end of a handoff channel (if any)
/// right after them (`HOTSWAP_HANDOFF_FD`), and `extra_env` added to this process's
/// environment (minus any inherited variables of the hand-over or notify protocols).
pub fn spawn_activated(
    command: &[String],
    sockets: &[(Protocol, BorrowedFd<'_>)],
    passing: FdPassing,
    handoff: Option<BorrowedFd<'_>>,
    extra_env: &[(&str, &OsStr)],
) -> Result<std::process::Child, SpawnError> {
    let program_name = command.first().ok_or(SpawnError::NoCommand)?;
    let program_path = resolve_program(program_name)?;
    let program = cstring(program_path.as_os_str().as_bytes())?;
    let numbers = fd_numbers(sockets);
    let expanded: Vec<String> = command.iter().map(|a| expand_fds(a, &numbers)).collect();
    let argv = expanded
        .iter()
        .map(|a| cstring(a.as_bytes()))
        .collect::<Result<Vec<_>, _>>()?;
    let names: Vec<String> = sockets.iter().map(|(p, _)| p.to_string()).collect();
    let mut env = Vec::new();
    for (key, value) in std::env::vars_os() {
        let skip =
            HANDED_OVER.iter().any(|k| key == *k) || extra_env.iter().any(|(k, _)| key == *k);
        if !skip {
            let mut entry = key.as_bytes().to_vec();
            entry.push(b'=');
            entry.extend_from_slice(value.as_bytes());
            env.push(cstring(&entry)?);
        }
    }
    let mut add = |key: &str, value: &[u8]| -> Result<(), SpawnError> {
        let mut entry = key.as_bytes().to_vec();
        entry.push(b'=');
        entry.extend_from_slice(value);
        env.push(cstring(&entry)?);
        Ok(())
    };
    for (protocol, fd) in &numbers {
        let key = match protocol {
            Protocol::Tcp => "HOTSWAP_FD_TCP",
            Protocol::Udp => "HOTSWAP_FD_UDP",
        };
        add(key, fd.to_string().as_bytes())?;
    }
    match passing {
        FdPassing::Systemd => {
            add("LISTEN_FDS", sockets.len().to_string().as_bytes())?;
            add("LISTEN_FDNAMES", names.join(":").as_bytes())?;
        }
        FdPassing::Nginx => {
            let list: String = numbers.iter().map(|(_, fd)| format!("{fd};")).collect();
            add("NGINX", list.as_bytes())?;
        }
    }
    if handoff.is_some() {
        let fd = LISTEN_FDS_START + sockets.len() as RawFd;
        add(crate::handoff::HANDOFF_FD_VAR, fd.to_string().as_bytes())?;
    }
    for (key, value) in extra_env {
        add(key, value.as_bytes())?;
    }
    let mut listen_pid = LISTEN_PID_PREFIX.to_vec();
    listen_pid.extend_from_slice(&[0u8; 11]);
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut env_ptrs: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
    // The child fills in its pid; only systemd's protocol has the variable.
    if passing == FdPassing::Systemd {
        env_ptrs.push(listen_pid.as_ptr().cast());
    }
    env_ptrs.push(std::ptr::null());
    let plan = ExecPlan {
        program,
        _argv: argv,
        argv_ptrs,
        _env: env,
        listen_pid,
        env_ptrs,
        fds: sockets
            .iter()
            .map(|(_, fd)| fd.as_raw_fd())
            .chain(handoff.map(|fd| fd.as_raw_fd()))
            .collect(),
        detach: Detach::Group,
    };
    run_plan(plan, &program_path, &expanded[1..]).map_err(|source| SpawnError::Spawn {
        program: program_name.clone(),
        source,
    })
}

/// Forks and runs `plan` in the child. A `std` child: nothing reaps it behind the supervisor's
/// back (tokio's children are reaped when dropped), so its pid stays its own until the
/// supervisor collects the exit through its pidfd.
fn run_plan(
    mut plan: ExecPlan,
    program: &Path,
    args: &[String],
) -> io::Result<std::process::Child> {
    use std::os::unix::process::CommandExt as _;
    let mut cmd = std::process::Command::new(program);
    cmd.args(args);
    if plan.detach == Detach::Session {
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
    }
    // SAFETY: ExecPlan::exec only makes async-signal-safe calls.
    unsafe {
        cmd.pre_exec(move || Err(plan.exec()));
    }
    cmd.spawn()
}

/// Starts a keeper (`hotswap keep`, from this very binary even if its file was replaced since)
/// holding `fds` at 3, 4, … in a session of its own, with nothing on stdin/stdout/stderr.
pub fn spawn_keeper(
    fds: &[BorrowedFd<'_>],
    service: &str,
    generation: u32,
) -> Result<std::process::Child, SpawnError> {
    const PROGRAM: &str = "/proc/self/exe";
    // The words only tell `ps` whose sockets these are.
    let args = vec![
        "keep".to_owned(),
        service.to_owned(),
        generation.to_string(),
    ];
    let argv = std::iter::once("hotswap")
        .chain(args.iter().map(String::as_str))
        .map(|a| cstring(a.as_bytes()))
        .collect::<Result<Vec<_>, _>>()?;
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let env = vec![cstring(b"PATH=/usr/bin:/bin")?];
    let mut env_ptrs: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
    env_ptrs.push(std::ptr::null());
    let plan = ExecPlan {
        program: cstring(PROGRAM.as_bytes())?,
        _argv: argv,
        argv_ptrs,
        _env: env,
        listen_pid: Vec::new(),
        env_ptrs,
        fds: fds.iter().map(|fd| fd.as_raw_fd()).collect(),
        detach: Detach::Session,
    };
    run_plan(plan, Path::new(PROGRAM), &args).map_err(|source| SpawnError::Spawn {
        program: "hotswap keep".to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_resolve_like_a_shell() {
        assert!(resolve_program("sh").is_ok());
        assert!(matches!(
            resolve_program("no-such-program-xyz"),
            Err(SpawnError::NotFound(_))
        ));
        assert!(matches!(
            resolve_program("/etc/passwd"),
            Err(SpawnError::NotFound(_))
        ));
    }

    #[test]
    fn children_get_socket_activation_variables() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let (handoff, _ours) = std::os::unix::net::UnixStream::pair().unwrap();
        let script = r#"test "$LISTEN_PID" = "$$" && test "$LISTEN_FDS" = 2 && test "$LISTEN_FDNAMES" = tcp:udp && test -S /proc/self/fd/3 && test -S /proc/self/fd/4 && test "$HOTSWAP_HANDOFF_FD" = 5 && test -S /proc/self/fd/5 && test "$EXTRA" = yes"#;
        let command: Vec<String> = ["sh", "-c", script].iter().map(|s| s.to_string()).collect();
        use std::os::fd::AsFd as _;
        let sockets = [
            (Protocol::Tcp, listener.as_fd()),
            (Protocol::Udp, udp.as_fd()),
        ];
        let mut child = spawn_activated(
            &command,
            &sockets,
            FdPassing::Systemd,
            Some(handoff.as_fd()),
            &[("EXTRA", OsStr::new("yes"))],
        )
        .unwrap();
        assert!(child.wait().unwrap().success());
    }

    #[test]
    fn nginx_gets_its_variable_and_fd_numbers_reach_the_arguments() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        // $1 is "{fd:tcp}" expanded, $2 "fd@{fd:udp}" expanded.
        let script = r#"test "$NGINX" = "3;4;" && test -z "$LISTEN_FDS" && test -z "$LISTEN_PID" && test "$HOTSWAP_FD_TCP" = 3 && test "$HOTSWAP_FD_UDP" = 4 && test "$1" = 3 && test "$2" = fd@4 && test -S /proc/self/fd/3"#;
        let command: Vec<String> = ["sh", "-c", script, "sh", "{fd:tcp}", "fd@{fd:udp}"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        use std::os::fd::AsFd as _;
        let sockets = [
            (Protocol::Tcp, listener.as_fd()),
            (Protocol::Udp, udp.as_fd()),
        ];
        let mut child = spawn_activated(&command, &sockets, FdPassing::Nginx, None, &[]).unwrap();
        assert!(child.wait().unwrap().success());
    }
}
