//! Giving freed heap memory back to the kernel.
//!
//! Loading the eBPF object parses the kernel's BTF (aya reads `/sys/kernel/btf/vmlinux`, several
//! MiB, whether or not relocations need it). glibc keeps what that freed at the top of the heap,
//! so the agent would carry those pages as resident memory for its whole life. Later, pages
//! freed in the middle of an arena stay resident too until a trim returns them, so the agent
//! trims now and then.

/// Returns free heap pages to the kernel (`malloc_trim(0)`); a no-op where the C library has no
/// such call.
pub fn trim() {
    #[cfg(target_env = "gnu")]
    // SAFETY: `malloc_trim` only walks glibc's own free lists; it takes no pointers from us.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn trimming_is_harmless_with_live_allocations() {
        let kept: Vec<Vec<u8>> = (0..64).map(|i| vec![i; 4096]).collect();
        drop((0..64).map(|i| vec![i; 65_536]).collect::<Vec<_>>());
        super::trim();
        assert!(
            kept.iter()
                .enumerate()
                .all(|(i, v)| v.iter().all(|b| usize::from(*b) == i))
        );
    }
}
