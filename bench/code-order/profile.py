#!/usr/bin/env python3
"""Writes gocast-agent/code-order.txt: the functions the agent runs in its steady state.

usage (root, from the workspace root, after `cargo build --release -p gocast-bench`):
    bench/code-order/profile.py BINARY

BINARY is the release agent as `cargo xtask bench` builds it
(`target/<triple>/release/gocast`: the release profile keeps symbols, the
package strips them), so the symbol names are the shipped build's.

How: one uprobe per Rust function of BINARY (tracefs `uprobe_events`), all
disabled while `gocast-bench bench memory` starts the agent with 300 apps;
30 s after the start they are enabled for 80 s (two of the 30 s sweeps,
`/metrics`, `/healthz`, `/stats`, `/apps` and `/info` read every 5 s), and
each probe is disabled as soon as it has fired, so the agent runs at nearly
full speed. The functions that fired, in their address order, come first;
then glibc's allocator, system-call wrappers and string functions by name
(uprobes on glibc's SIMD string functions hung the agent, so they are not
probed). See docs/benchmarks.md, "### Memory".
"""
import json
import os
import re
import subprocess
import sys
import time

TRACING = '/sys/kernel/tracing'
GROUP = 'gcorder'
APPS = '300'
START_AFTER = 30
WINDOW = 80
API = 'http://127.0.0.1:8080'
GLIBC = re.compile(
    r'^(__libc_)?(malloc|free|realloc|calloc)$|^_int_|malloc|tcache|arena_get|unlink_chunk|'
    r'systrim|morecore|sbrk|^__brk$|epoll|^(__)?(libc_)?(read|write|readv|writev|recv|send|'
    r'recvfrom|recvmsg|sendto|sendmsg|accept4?|close|connect|socket|ioctl|fstat|fstatat64|'
    r'statx|openat|madvise|mmap|munmap|mprotect|nanosleep|clock_gettime|clock_nanosleep|'
    r'syscall|getpid|gettid|sched_yield|poll|ppoll)(64)?$|pthread_mutex|pthread_cond|'
    r'pthread_getspecific|pthread_self|futex|lll_|errno_location|tls_get_addr|avx|evex|erms')


def functions(binary):
    """{name: (file offset, address)} of the defined functions, first name per address."""
    execs = []
    out = subprocess.run(['readelf', '-lW', binary], capture_output=True, text=True, check=True)
    for line in out.stdout.splitlines():
        f = line.split()
        if f and f[0] == 'LOAD' and 'E' in f[-2]:
            execs.append((int(f[1], 16), int(f[2], 16), int(f[4], 16)))
    found = {}
    out = subprocess.run(['readelf', '-sW', binary], capture_output=True, text=True, check=True)
    for line in out.stdout.splitlines():
        f = line.split()
        if len(f) < 8 or f[3] != 'FUNC' or f[6] == 'UND' or f[7] in found:
            continue
        addr = int(f[1], 16)
        for off, vaddr, size in execs:
            if vaddr <= addr < vaddr + size:
                found[f[7]] = (addr - vaddr + off, addr)
    return found


def write(path, text):
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, text.encode())
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def enable(i, on):
    return write(f'{TRACING}/events/{GROUP}/f{i}/enable', '1' if on else '0')


def fired():
    out = set()
    with open(f'{TRACING}/uprobe_profile') as profile:
        for line in profile:
            f = line.split()
            if len(f) >= 3 and f[1].startswith('f') and int(f[2]) > 0:
                out.add(int(f[1][1:]))
    return out


def main():
    binary = os.path.abspath(sys.argv[1])
    if not os.path.ismount(TRACING):
        subprocess.run(['mount', '-t', 'tracefs', 'nodev', TRACING], check=True)
    funcs = functions(binary)
    rust = sorted((n for n in funcs if n.startswith(('_ZN', '_R'))), key=lambda n: funcs[n][1])
    for i, name in enumerate(rust):
        write(f'{TRACING}/uprobe_events', f'p:{GROUP}/f{i} {binary}:0x{funcs[name][0]:x}\n')
    bench = subprocess.Popen(['target/release/gocast-bench', 'bench', 'memory', '--apps', APPS,
                              '--settle-s', '150', '--agent', binary])
    seen = set()
    try:
        pid = None
        for _ in range(60):
            pids = subprocess.run(['pgrep', '-f', f'^{binary} .*run --config'],
                                  capture_output=True, text=True).stdout.split()
            if pids:
                pid = pids[0]
                break
            time.sleep(1)
        if pid is None:
            sys.exit('the agent did not start')
        time.sleep(START_AFTER)
        on = [i for i in range(len(rust)) if enable(i, True)]
        print(f'{len(on)} of {len(rust)} probes on', file=sys.stderr)
        end, asked = time.time() + WINDOW, 0.0
        while time.time() < end:
            if time.time() - asked >= 5:
                asked = time.time()
                for path in ['metrics', 'healthz', 'stats', 'apps', 'info']:
                    subprocess.run(['nsenter', f'--net=/proc/{pid}/ns/net', 'curl', '-s', '-o',
                                    '/dev/null', '--max-time', '2', f'{API}/{path}'])
            for i in fired() - seen:
                seen.add(i)
                enable(i, False)
            time.sleep(1)
        seen |= fired()
    finally:
        glibc = sorted((n for n in funcs if not n.startswith(('_ZN', '_R', 'ring_core'))
                        and GLIBC.search(n)), key=lambda n: funcs[n][1])
        hot = [rust[i] for i in sorted(seen)]
        if hot:
            with open('gocast-agent/code-order.txt', 'w') as order:
                order.write('\n'.join(hot + glibc) + '\n')
            print(f'{len(hot)} functions ran, {len(glibc)} glibc functions by name',
                  file=sys.stderr)
        bench.wait()
        # One RCU grace period per probe: this takes minutes.
        write(f'{TRACING}/events/{GROUP}/enable', '0')
        with open(f'{TRACING}/uprobe_events', 'w') as events:
            events.write('')


if __name__ == '__main__':
    main()
