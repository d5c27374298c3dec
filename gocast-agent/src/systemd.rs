//! systemd's service notifications (`sd_notify(3)`), written by hand: one datagram per message
//! on the socket named in `NOTIFY_SOCKET`, no libsystemd, and nothing at all without systemd.
//!
//! Under `Type=notify` the service manager passes a Unix datagram socket in `NOTIFY_SOCKET` (a
//! path, or `@name` in the abstract namespace) and, with `WatchdogSec=`, the timeout in
//! `WATCHDOG_USEC`. The agent says:
//! - `READY=1` once the lifecycle has restored the config apps and the saved registrations (the
//!   host's start-up clean-up ran before): [`notify_ready`];
//! - `STATUS=` a one-line summary when it changes, at most once a second: [`notify_status`];
//! - `WATCHDOG=1` from the lifecycle's loop every half `WATCHDOG_USEC`
//!   ([`crate::supervise::Heartbeat`]), so a stuck lifecycle stops the pings;
//! - `RELOADING=1` with `MONOTONIC_USEC=` when a reload starts, `READY=1` when it is done:
//!   [`notify_reloading`], [`notify_ready`];
//! - `STOPPING=1` when shutdown starts: [`notify_stopping`].
//!
//! The environment is read once, on first use. Without `NOTIFY_SOCKET` every call does nothing.
//! A send never blocks the caller (the lifecycle loop pings the watchdog): when the manager's
//! queue is full the message is dropped.
//!
//! Written by hand rather than with a crate: the sender is an instance that tests point at a
//! socket of their own (no environment), and its messages are a pure function they can check.

use std::{
    ffi::OsStr,
    fmt::Write as _,
    io,
    os::{
        linux::net::SocketAddrExt,
        unix::{
            ffi::OsStrExt,
            net::{SocketAddr, UnixDatagram},
        },
    },
    sync::{
        OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tracing::{debug, warn};

/// Why notifications cannot be set up or sent.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("NOTIFY_SOCKET={0:?} is neither a path nor an abstract socket (@name)")]
    UnsupportedAddress(String),
    #[error("NOTIFY_SOCKET={address:?}")]
    Address {
        address: String,
        #[source]
        source: io::Error,
    },
    #[error("creating the notification socket")]
    Socket(#[source] io::Error),
    #[error("sending {message:?} to the service manager")]
    Send {
        message: String,
        #[source]
        source: io::Error,
    },
}

/// One assignment of a notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State<'a> {
    /// Start-up (or a reload) is finished.
    Ready,
    /// A reload starts; `monotonic` is `CLOCK_MONOTONIC` now, which `Type=notify-reload` requires
    /// with it.
    Reloading { monotonic: Duration },
    /// Shutdown starts.
    Stopping,
    /// Free text for `systemctl status`; made one line.
    Status(&'a str),
    /// Still alive: resets the service manager's watchdog timer.
    Watchdog,
}

/// The datagram for `states`: one `KEY=value` line each, in order.
pub fn message(states: &[State<'_>]) -> String {
    let mut out = String::new();
    for state in states {
        // Writing into a String cannot fail.
        let _ = match state {
            State::Ready => writeln!(out, "READY=1"),
            State::Reloading { monotonic } => {
                writeln!(out, "RELOADING=1\nMONOTONIC_USEC={}", monotonic.as_micros())
            }
            State::Stopping => writeln!(out, "STOPPING=1"),
            State::Status(text) => {
                // A newline would end the assignment and start a bogus one.
                let line: String = text
                    .chars()
                    .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
                    .collect();
                writeln!(out, "STATUS={line}")
            }
            State::Watchdog => writeln!(out, "WATCHDOG=1"),
        };
    }
    out
}

/// A connection to the service manager's notification socket.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// From the process environment; `None` without `NOTIFY_SOCKET` or when it is unusable
    /// (logged).
    fn from_env() -> Option<Self> {
        let vars = |k| std::env::var_os(k);
        Self::from_vars(
            vars("NOTIFY_SOCKET").as_deref(),
            vars("WATCHDOG_USEC").as_deref(),
            vars("WATCHDOG_PID").as_deref(),
            std::process::id(),
        )
        .inspect_err(|e| {
            warn!(error = %crate::error_chain(e), "systemd notifications disabled");
        })
        .ok()
        .flatten()
    }

    /// From the values of `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` for process `pid`.
    /// `Ok(None)` without a socket: notifications are off, the watchdog too.
    pub fn from_vars(
        socket: Option<&OsStr>,
        watchdog_usec: Option<&OsStr>,
        watchdog_pid: Option<&OsStr>,
        pid: u32,
    ) -> Result<Option<Self>, NotifyError> {
        let Some(socket) = socket.filter(|s| !s.is_empty()) else {
            return Ok(None);
        };
        let notifier = Self::connect(socket)?;
        Ok(Some(Self {
            watchdog: watchdog(watchdog_usec, watchdog_pid, pid),
            ..notifier
        }))
    }

    /// A notifier for `socket` (a path, or `@name`), without a watchdog.
    pub fn connect(socket: &OsStr) -> Result<Self, NotifyError> {
        let addr = address(socket)?;
        let socket = UnixDatagram::unbound().map_err(NotifyError::Socket)?;
        // The lifecycle loop sends the watchdog pings: it must never wait on the manager.
        socket.set_nonblocking(true).map_err(NotifyError::Socket)?;
        Ok(Self {
            socket,
            addr,
            watchdog: None,
        })
    }

    /// The watchdog timeout the manager expects pings within, if it watches this process.
    pub fn watchdog(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Sends one datagram with every state.
    pub fn send(&self, states: &[State<'_>]) -> Result<(), NotifyError> {
        let text = message(states);
        self.socket
            .send_to_addr(text.as_bytes(), &self.addr)
            .map(drop)
            .map_err(|source| NotifyError::Send {
                message: text.trim_end().to_owned(),
                source,
            })
    }
}

/// The socket address `NOTIFY_SOCKET` names: an absolute path, or `@name` (abstract).
fn address(socket: &OsStr) -> Result<SocketAddr, NotifyError> {
    let bytes = socket.as_bytes();
    let shown = || socket.to_string_lossy().into_owned();
    let parsed = match bytes.first() {
        Some(b'/') => SocketAddr::from_pathname(socket),
        Some(b'@') => SocketAddr::from_abstract_name(&bytes[1..]),
        // `vsock:` (systemd in a VM) and anything else.
        _ => return Err(NotifyError::UnsupportedAddress(shown())),
    };
    parsed.map_err(|source| NotifyError::Address {
        address: shown(),
        source,
    })
}

/// `WATCHDOG_USEC`, unless absent, not a positive number, or meant for another process
/// (`WATCHDOG_PID` set to another PID, as `sd_watchdog_enabled(3)` checks).
fn watchdog(usec: Option<&OsStr>, pid_var: Option<&OsStr>, pid: u32) -> Option<Duration> {
    if let Some(owner) = pid_var
        && owner.to_str().and_then(|p| p.parse::<u32>().ok()) != Some(pid)
    {
        return None;
    }
    let usec: u64 = usec?.to_str()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// The process's notifier, from the environment on first use.
fn global() -> Option<&'static Notifier> {
    static NOTIFIER: OnceLock<Option<Notifier>> = OnceLock::new();
    NOTIFIER.get_or_init(Notifier::from_env).as_ref()
}

/// Sends to the process's notifier, if any; the first failure is a WARN, later ones DEBUG (a
/// manager that went away must not flood the log once a second).
fn send(states: &[State<'_>]) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    let Some(notifier) = global() else {
        return;
    };
    if let Err(e) = notifier.send(states) {
        if WARNED.swap(true, Ordering::Relaxed) {
            debug!(error = %crate::error_chain(&e), "systemd notification failed");
        } else {
            warn!(error = %crate::error_chain(&e), "systemd notification failed");
        }
    }
}

/// Whether a service manager listens (`NOTIFY_SOCKET` is set and usable).
pub fn enabled() -> bool {
    global().is_some()
}

/// The service manager's watchdog timeout for this process, if it has one.
pub fn watchdog_timeout() -> Option<Duration> {
    global().and_then(Notifier::watchdog)
}

/// `READY=1`: start-up, or a reload, is done.
pub fn notify_ready() {
    send(&[State::Ready]);
}

/// `RELOADING=1` + `MONOTONIC_USEC=`: a reload starts; call [`notify_ready`] when it is done.
pub fn notify_reloading() {
    if !enabled() {
        return;
    }
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(now) => send(&[State::Reloading {
            monotonic: Duration::from(now),
        }]),
        Err(e) => warn!(error = %e, "cannot read CLOCK_MONOTONIC for the reload notification"),
    }
}

/// `STOPPING=1`: shutdown starts.
pub fn notify_stopping() {
    send(&[State::Stopping]);
}

/// `STATUS=`: the one-line summary `systemctl status` shows.
pub fn notify_status(status: &str) {
    send(&[State::Status(status)]);
}

/// `WATCHDOG=1`: the lifecycle still turns.
pub fn notify_watchdog() {
    send(&[State::Watchdog]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(s: &str) -> &OsStr {
        OsStr::new(s)
    }

    #[test]
    fn messages_are_one_assignment_per_line_in_order() {
        let table: &[(&[State<'_>], &str)] = &[
            (&[State::Ready], "READY=1\n"),
            (&[State::Stopping], "STOPPING=1\n"),
            (&[State::Watchdog], "WATCHDOG=1\n"),
            (
                &[State::Status("3 apps, 2 announced, 1/1 peers established")],
                "STATUS=3 apps, 2 announced, 1/1 peers established\n",
            ),
            (
                &[State::Reloading {
                    monotonic: Duration::from_micros(1_234_567_890),
                }],
                "RELOADING=1\nMONOTONIC_USEC=1234567890\n",
            ),
            (
                &[State::Ready, State::Status("reloaded")],
                "READY=1\nSTATUS=reloaded\n",
            ),
            (&[State::Status("two\nlines\r")], "STATUS=two lines \n"),
        ];
        for (states, want) in table {
            assert_eq!(message(states), *want, "{states:?}");
        }
    }

    #[test]
    fn without_notify_socket_nothing_is_set_up() {
        let pid = std::process::id();
        let none = Notifier::from_vars(None, Some(os("2000000")), None, pid).unwrap();
        assert!(none.is_none());
        let empty = Notifier::from_vars(Some(os("")), None, None, pid).unwrap();
        assert!(empty.is_none());
    }

    #[test]
    fn addresses_are_paths_or_abstract_names() {
        assert!(address(os("/run/systemd/notify")).is_ok());
        let abs = address(os("@gocast-test")).unwrap();
        assert_eq!(abs.as_abstract_name(), Some(&b"gocast-test"[..]));
        for bad in ["vsock:2:1234", "relative/path"] {
            assert!(
                matches!(address(os(bad)), Err(NotifyError::UnsupportedAddress(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_watchdog_is_ours_only_with_a_positive_timeout_and_our_pid() {
        let us = 4242;
        let table: &[(Option<&str>, Option<&str>, Option<Duration>)] = &[
            (None, None, None),
            (Some("2000000"), None, Some(Duration::from_secs(2))),
            (Some("2000000"), Some("4242"), Some(Duration::from_secs(2))),
            (Some("2000000"), Some("1"), None),
            (Some("2000000"), Some("x"), None),
            (Some("0"), None, None),
            (Some("soon"), None, None),
        ];
        for (usec, pid, want) in table {
            assert_eq!(
                watchdog(usec.map(os), pid.map(os), us),
                *want,
                "{usec:?} {pid:?}"
            );
        }
    }

    #[test]
    fn a_notifier_sends_datagrams_to_a_path_and_an_abstract_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        let notifier = Notifier::from_vars(
            Some(path.as_os_str()),
            Some(os("30000000")),
            None,
            std::process::id(),
        )
        .unwrap()
        .unwrap();
        assert_eq!(notifier.watchdog(), Some(Duration::from_secs(30)));
        notifier
            .send(&[State::Ready, State::Status("1 apps")])
            .unwrap();
        notifier.send(&[State::Watchdog]).unwrap();
        let mut buf = [0u8; 256];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=1 apps\n");
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1\n");

        let name = format!("gocast-notify-test-{}", std::process::id());
        let abs = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&name).unwrap()).unwrap();
        let notifier = Notifier::connect(os(&format!("@{name}"))).unwrap();
        notifier.send(&[State::Stopping]).unwrap();
        let n = abs.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1\n");
    }

    #[test]
    fn a_socket_nobody_listens_on_is_an_error_not_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        let notifier = Notifier::connect(dir.path().join("gone").as_os_str()).unwrap();
        let err = notifier.send(&[State::Watchdog]).unwrap_err();
        assert!(matches!(err, NotifyError::Send { .. }), "{err}");
    }
}
