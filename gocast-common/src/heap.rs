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

/// The block size from which glibc gives a block a mapping of its own (its initial threshold).
pub const MMAP_THRESHOLD: usize = 128 * 1024;

/// Keeps large blocks (from [`MMAP_THRESHOLD`]: `/stats` snapshots, netlink dumps, state-file
/// buffers with thousands of apps) in mappings of their own, returned whole when freed.
///
/// glibc raises its threshold to the size of any mapped block freed, up to 32 MiB (mallopt(3),
/// `M_MMAP_THRESHOLD`), and the eBPF loader frees such blocks at start: every large block after
/// that would be carved out of the per-thread arenas, which keep the pages between them.
/// Setting the threshold turns that adjustment off. Measured with 1,000 apps: −0.4 to −0.8 MiB
/// resident (docs/benchmarks.md, "### Memory"). A no-op where the C library is not glibc.
pub fn keep_large_blocks_mapped() {
    #[cfg(target_env = "gnu")]
    // SAFETY: `mallopt` sets one of glibc's own parameters; it takes no pointers.
    unsafe {
        libc::mallopt(
            libc::M_MMAP_THRESHOLD,
            libc::c_int::try_from(MMAP_THRESHOLD).unwrap_or(libc::c_int::MAX),
        );
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

    #[cfg(target_env = "gnu")]
    #[test]
    fn a_large_block_keeps_its_own_mapping_after_a_larger_one_was_freed() {
        use std::hint::black_box;
        // Freeing a mapped 4 MiB block would raise glibc's threshold to 4 MiB.
        super::keep_large_blocks_mapped();
        drop(black_box(vec![1u8; 4 << 20]));
        let block = black_box(vec![1u8; super::MMAP_THRESHOLD * 2]);
        // glibc's chunk header, the word before the block: bit 1 is IS_MMAPPED.
        // SAFETY: the word before a block glibc's malloc returned is that chunk's size field.
        let size_field = usize::from_ne_bytes(unsafe {
            block
                .as_ptr()
                .sub(size_of::<usize>())
                .cast::<[u8; size_of::<usize>()]>()
                .read()
        });
        assert_ne!(size_field & 2, 0, "the block was carved out of an arena");
    }
}
