//! TCP MD5 signatures (RFC 2385) for BGP sessions: the `TCP_MD5SIG` socket option.
//!
//! Neither `socket2` nor `nix` offers it, so this is the one `setsockopt` the agent makes by
//! hand. The layout is `struct tcp_md5sig` from `include/uapi/linux/tcp.h`.

use std::{
    io,
    net::IpAddr,
    os::fd::{AsFd, AsRawFd},
};

/// `TCP_MD5SIG_MAXKEYLEN`: the longest key the kernel takes.
pub const MAX_KEY_LEN: usize = 80;

/// `struct tcp_md5sig`: a `sockaddr_storage` (128 bytes, 8-aligned), flags, prefix length, key
/// length, interface index, key. 216 bytes, no padding.
#[repr(C, align(8))]
struct TcpMd5Sig {
    addr: [u8; 128],
    flags: u8,
    prefixlen: u8,
    keylen: u16,
    ifindex: i32,
    key: [u8; MAX_KEY_LEN],
}

const _: () = assert!(size_of::<TcpMd5Sig>() == 216);

/// Signs the socket's segments to and from `peer` with `key`. Call it before `connect` (or on
/// the listening socket, once per peer). An empty key removes the signature.
///
/// # Errors
/// A key longer than [`MAX_KEY_LEN`], or the kernel's refusal (e.g. no `CONFIG_TCP_MD5SIG`).
pub fn set(socket: &impl AsFd, peer: IpAddr, key: &[u8]) -> io::Result<()> {
    if key.len() > MAX_KEY_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("a TCP MD5 key is at most {MAX_KEY_LEN} bytes"),
        ));
    }
    let mut sig = TcpMd5Sig {
        addr: [0; 128],
        flags: 0,
        prefixlen: 0,
        keylen: u16::try_from(key.len()).unwrap_or(0),
        ifindex: 0,
        key: [0; MAX_KEY_LEN],
    };
    sig.key[..key.len()].copy_from_slice(key);
    // sockaddr_in / sockaddr_in6: family in host order, port 0, then the address.
    match peer {
        IpAddr::V4(a) => {
            sig.addr[..2].copy_from_slice(&u16::try_from(libc::AF_INET).unwrap_or(0).to_ne_bytes());
            sig.addr[4..8].copy_from_slice(&a.octets());
        }
        IpAddr::V6(a) => {
            sig.addr[..2]
                .copy_from_slice(&u16::try_from(libc::AF_INET6).unwrap_or(0).to_ne_bytes());
            sig.addr[8..24].copy_from_slice(&a.octets());
        }
    }
    let len = libc::socklen_t::try_from(size_of::<TcpMd5Sig>()).unwrap_or(0);
    // SAFETY: `sig` is a valid, fully initialised `struct tcp_md5sig` that outlives the call,
    // `len` is its size, and the fd is borrowed from a live socket.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_MD5SIG,
            (&raw const sig).cast(),
            len,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    #[test]
    fn a_key_is_accepted_for_ipv4_and_ipv6_peers() {
        let v4 = TcpListener::bind("127.0.0.1:0").unwrap();
        set(&v4, "127.0.0.2".parse().unwrap(), b"secret").unwrap();
        if let Ok(v6) = TcpListener::bind("[::1]:0") {
            set(&v6, "::2".parse().unwrap(), b"secret").unwrap();
        }
    }

    #[test]
    fn a_key_longer_than_the_kernel_takes_is_refused() {
        let s = TcpListener::bind("127.0.0.1:0").unwrap();
        let e = set(&s, "127.0.0.2".parse().unwrap(), &[b'k'; 81]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }
}
