//! `cargo xtask bench serve-http` (hidden): the HTTP service the NAT benchmark loads.
//!
//! Python's `http.server` serves one request at a time and would be the bottleneck that hides
//! the NAT's cost. This one answers every `GET` with a fixed 13-byte body from a pool of
//! threads, each blocking in `accept` and then serving its connection until the client closes
//! it (keepalive) or asked for `Connection: close`. A pool, not a thread per connection, so a
//! short connection costs no thread start. The pool must be larger than the load generator's
//! connection count, since a keepalive connection holds its thread.
//!
//! It runs inside the benchmark's namespace as `ip netns exec NS gocast-bench bench serve-http ..`
//! and is stopped by PID; it prints `ready` once it listens.

use std::{
    io::{self, Read as _, Write as _},
    net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    thread,
};

use anyhow::{Context, Result};
use clap::Args;

/// Arguments of `cargo xtask bench serve-http`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TCP port to listen on (all addresses, IPv4 and IPv6).
    #[arg(long)]
    port: u16,
    /// Worker threads; each serves one connection at a time.
    #[arg(long, default_value_t = 64)]
    threads: usize,
    /// The response body (a newline is added), e.g. the host's name in `cargo xtask demo`.
    #[arg(long, default_value = "hello, world")]
    body: String,
}

/// Serves until killed.
pub fn serve(args: &ServeArgs) -> Result<()> {
    let addr = SocketAddr::from((Ipv6Addr::UNSPECIFIED, args.port));
    // `[::]` accepts IPv4 as well (`net.ipv6.bindv6only` is 0 in a fresh namespace).
    let listener = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
    let keepalive: &'static [u8] = response(&args.body, false).leak();
    let close: &'static [u8] = response(&args.body, true).leak();
    let workers: Vec<_> = (0..args.threads.max(1))
        .map(|_| {
            let listener = listener.try_clone()?;
            Ok(thread::spawn(move || {
                accept_loop(&listener, [keepalive, close]);
            }))
        })
        .collect::<io::Result<_>>()
        .context("cloning the listener")?;
    println!("ready");
    for worker in workers {
        let _ = worker.join();
    }
    Ok(())
}

/// `responses`: the keepalive answer, then the `Connection: close` one.
fn accept_loop(listener: &TcpListener, responses: [&[u8]; 2]) {
    loop {
        if let Ok((stream, _)) = listener.accept() {
            // A client that resets is its own problem; the thread goes back to `accept`.
            let _ = serve_connection(stream, responses);
        }
    }
}

/// Answers the requests on one connection until EOF or a `Connection: close` request.
fn serve_connection(mut stream: TcpStream, [keepalive, close_it]: [&[u8]; 2]) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut buf = vec![0; 8192];
    let mut filled = 0;
    loop {
        // Every complete request head in the buffer gets its answer (pipelining is allowed).
        while let Some(end) = head_end(&buf[..filled]) {
            let close = wants_close(&buf[..end]);
            stream.write_all(if close { close_it } else { keepalive })?;
            buf.copy_within(end..filled, 0);
            filled -= end;
            if close {
                return Ok(());
            }
        }
        if filled == buf.len() {
            // A request head larger than the buffer: not our load generator.
            return Ok(());
        }
        match stream.read(&mut buf[filled..])? {
            0 => return Ok(()),
            n => filled += n,
        }
    }
}

/// The offset just past the first `\r\n\r\n`, if a whole request head is there.
fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// Whether a request head carries `Connection: close` (header names are case-insensitive).
fn wants_close(head: &[u8]) -> bool {
    head.split(|&b| b == b'\n').any(|line| {
        let line = String::from_utf8_lossy(line).to_ascii_lowercase();
        line.strip_prefix("connection:")
            .is_some_and(|v| v.trim() == "close")
    })
}

fn response(body: &str, close: bool) -> Vec<u8> {
    let connection = if close { "close" } else { "keep-alive" };
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n{body}\n",
        body.len() + 1
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_heads_are_split_and_close_is_seen() {
        let two = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nConnection: Close\r\n\r\n";
        let first = head_end(two).unwrap();
        assert!(!wants_close(&two[..first]));
        let second = head_end(&two[first..]).unwrap();
        assert!(wants_close(&two[first..first + second]));
        assert_eq!(first + second, two.len());
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n"), None);
    }

    #[test]
    fn responses_carry_length_and_connection() {
        let r = String::from_utf8(response("hello, world", true)).unwrap();
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(r.contains("Content-Length: 13\r\n"));
        assert!(r.contains("Connection: close\r\n"));
        assert!(r.ends_with("\r\n\r\nhello, world\n"));
    }

    #[test]
    fn it_serves_over_a_socket() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let (k, c) = (response("hi", false), response("hi", true));
            serve_connection(s, [&k, &c]).unwrap();
        });
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(b"GET / HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        assert_eq!(out.matches("\r\n\r\nhi\n").count(), 2);
    }
}
