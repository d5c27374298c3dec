//! Giving the start-up's code and read-only data pages back to the kernel.
//!
//! The agent's start (config parsing, the eBPF loader and its relocations, netlink and
//! iptables set-up, the first install of every app) runs code the steady state never runs
//! again, and the kernel maps a binary's code 64 KiB around each page fault
//! (`fault_around_bytes`), so once started nearly all of the binary's text is resident
//! (docs/benchmarks.md, "### Memory"). `MADV_PAGEOUT` (Linux 5.4,
//! <https://man7.org/linux/man-pages/man2/madvise.2.html>) reclaims those clean pages; what
//! runs again faults back in, from the page cache or from the file. The kernel skips pages
//! another process also maps. The mappings are advised `MADV_RANDOM` first: a fault then reads
//! its own page, not the read-around window (128 KiB) that fault-around would map whole, so what
//! comes back is close to what runs.

use std::{fs, io, path::Path};

/// Asks the kernel to reclaim the resident pages of this process's own code and read-only data:
/// the read-only mappings of its binary (not the libraries, which other processes share, and
/// no writable data). Returns the bytes advised.
///
/// # Errors
///
/// The process's maps cannot be read, or the kernel refuses the advice (before Linux 5.4:
/// `EINVAL`).
pub fn page_out() -> io::Result<usize> {
    let exe = fs::read_link("/proc/self/exe")?;
    let maps = fs::read_to_string("/proc/self/maps")?;
    let mut advised = 0;
    for (start, end) in maps.lines().filter_map(|line| code_of(line, &exe)) {
        let len = end - start;
        for advice in [libc::MADV_RANDOM, libc::MADV_PAGEOUT] {
            // SAFETY: `start..end` is a read-only mapping of this process's own binary. Neither
            // advice changes what the pages hold: `MADV_RANDOM` only turns off read-ahead, and
            // `MADV_PAGEOUT` reclaims pages the kernel reads back when they are next touched
            // (clean file pages from the file; the few written at relocation, now read-only,
            // from swap or they stay).
            let rc = unsafe { libc::madvise(start as *mut libc::c_void, len, advice) };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        advised += len;
    }
    Ok(advised)
}

/// The address range of a `/proc/self/maps` line that maps `exe` read-only, executable or not
/// (`start-end r-xp offset dev inode path`).
fn code_of(line: &str, exe: &Path) -> Option<(usize, usize)> {
    let mut fields = line.split_whitespace();
    let range = fields.next()?;
    if !matches!(fields.next()?, "r-xp" | "r--p") || Path::new(fields.nth(3)?) != exe {
        return None;
    }
    let (start, end) = range.split_once('-')?;
    let (start, end) = (
        usize::from_str_radix(start, 16).ok()?,
        usize::from_str_radix(end, 16).ok()?,
    );
    (start < end).then_some((start, end))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn only_the_binarys_read_only_mappings_are_paged_out() {
        let exe = Path::new("/usr/bin/gocast");
        let line = |rest: &str| format!("55d0c0a00000-55d0c0b00000 {rest}");
        assert_eq!(
            code_of(&line("r-xp 00001000 fd:01 42 /usr/bin/gocast"), exe),
            Some((0x55d0_c0a0_0000, 0x55d0_c0b0_0000))
        );
        assert!(code_of(&line("r--p 00000000 fd:01 42 /usr/bin/gocast"), exe).is_some());
        for other in [
            "rw-p 00200000 fd:01 42 /usr/bin/gocast",
            "r-xp 00028000 fd:01 7 /usr/lib/x86_64-linux-gnu/libc.so.6",
            "r-xp 00000000 00:00 0",
            "r-xp 00000000 00:00 0 [vdso]",
        ] {
            assert_eq!(code_of(&line(other), exe), None, "{other}");
        }
        assert_eq!(code_of("garbage", exe), None);
        assert_eq!(
            code_of("zz-55 r-xp 00001000 fd:01 42 /usr/bin/gocast", exe),
            None
        );
    }

    #[test]
    fn paging_out_the_running_code_keeps_it_running() {
        let advised = page_out().expect("madvise(MADV_PAGEOUT) on the test binary");
        assert!(advised > 0);
        // Code and data whose pages were just reclaimed fault back in.
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        assert!(maps.lines().any(|l| code_of(l, &exe).is_some()));
    }
}
