//! `exec:CMD` monitors: `sh -c CMD`, healthy on exit 0 within the timeout.
//!
//! GoCast ran these with no timeout, so one hung script froze every check. Here the command
//! runs in its own process group and the whole group is killed when the timeout passes (a
//! shell's children would otherwise outlive it and pile up).

use std::{process::Stdio, time::Duration};

use nix::{sys::signal::Signal, unistd::Pid};
use tokio::{io::AsyncReadExt, process::Command};

/// The most of a failing command's output kept for its reason in `/apps`.
const MAX_OUTPUT: usize = 512;
/// How long output may trail the command's exit.
const OUTPUT_GRACE: Duration = Duration::from_millis(50);

/// Kills a check's process group when dropped: what a check started in the background must
/// not outlive it, nor the agent.
struct GroupKiller(Option<Pid>);

impl Drop for GroupKiller {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            // Usually the group is already gone (ESRCH): nothing to do then.
            let _ = nix::sys::signal::killpg(pgid, Signal::SIGKILL);
        }
    }
}

/// The verdict of one run: `Ok` with nothing to say, or `Err` with the reason.
pub async fn run(command: &str, timeout: Duration) -> Result<(), String> {
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start /bin/sh: {e}"))?;
    // However this future ends (done, timed out, or dropped at shutdown), the whole group goes.
    let _group = GroupKiller(
        child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .map(Pid::from_raw),
    );
    // Output is read beside the wait: a background child that keeps stderr open must not turn
    // a finished command into a timeout.
    let reader = child.stderr.take().map(|s| {
        tokio::spawn(async move {
            let mut out = Vec::new();
            // Read at most a little more than we keep: a chatty script must not grow memory.
            let _ = s.take(4 * MAX_OUTPUT as u64).read_to_end(&mut out).await;
            out
        })
    });
    let outcome = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(status) => {
            let out = match reader {
                Some(r) => tokio::time::timeout(OUTPUT_GRACE, r)
                    .await
                    .ok()
                    .and_then(Result::ok),
                None => None,
            };
            Ok((status, out.unwrap_or_default()))
        }
        Err(elapsed) => Err(elapsed),
    };
    match outcome {
        Ok((Ok(status), _)) if status.success() => Ok(()),
        Ok((Ok(status), out)) => {
            let text = String::from_utf8_lossy(&out);
            let text = text.trim();
            let tail = &text[text.floor_char_boundary(text.len().saturating_sub(MAX_OUTPUT))..];
            if tail.is_empty() {
                Err(format!("{status}"))
            } else {
                Err(format!("{status}: {tail}"))
            }
        }
        Ok((Err(e), _)) => Err(format!("cannot wait for command: {e}")),
        Err(_) => Err(format!(
            "timed out after {}",
            crate::config::go_duration::format(timeout)
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    #[tokio::test]
    async fn exit_zero_is_healthy() {
        assert_eq!(run("true", Duration::from_secs(5)).await, Ok(()));
    }

    #[tokio::test]
    async fn non_zero_exit_is_a_failure_with_its_output() {
        let e = run("echo broken >&2; exit 3", Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(e.contains("exit status: 3") && e.contains("broken"), "{e}");
    }

    #[tokio::test]
    async fn commands_with_colons_run_whole() {
        assert_eq!(
            run("test a:b = 'a:b'", Duration::from_secs(5)).await,
            Ok(())
        );
    }

    #[tokio::test]
    async fn a_dropped_check_takes_its_processes_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("survived");
        let cmd = format!("(sleep 1; touch {}) & sleep 30", marker.display());
        let run = run(&cmd, Duration::from_secs(60));
        // Dropped mid-run, as at shutdown.
        assert!(
            tokio::time::timeout(Duration::from_millis(200), run)
                .await
                .is_err()
        );
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(!marker.exists(), "a child outlived the dropped check");
    }

    #[tokio::test]
    async fn a_hung_command_is_killed_with_its_children_at_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("survived");
        let cmd = format!("(sleep 1; touch {}) & sleep 30", marker.display());
        let start = Instant::now();
        let e = run(&cmd, Duration::from_millis(200)).await.unwrap_err();
        assert!(e.contains("timed out after 200ms"), "{e}");
        assert!(start.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(
            !marker.exists(),
            "the background child outlived the timeout"
        );
    }
}
