//! `docs/benchmarks.md` and its charts (`docs/img/*.svg`), written by `cargo xtask bench`.
//!
//! Charts are drawn with plotters' SVG backend alone: text goes out as SVG `<text>`, laid out by
//! the viewer, so no font files or system libraries are needed to draw them.

use std::{
    fmt::Write as _,
    ops::Range,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result};
use plotters::{
    chart::{ChartContext, SeriesLabelPosition},
    coord::{Shift, cartesian::Cartesian2d, types::RangedCoordf64},
    prelude::{
        BLACK, BLUE, ChartBuilder, Circle, Color as _, DrawingArea, GREEN, IntoDrawingArea as _,
        LineSeries, MAGENTA, PathElement, RED, RGBColor, Rectangle, SVGBackend, WHITE,
    },
};
use xtask::workspace_root;

use super::{
    Summary,
    api::ApiReport,
    bgp::BgpReport,
    memory::MemoryReport,
    mib, ms,
    nat::{Attribution, Kind, Mode, NatReport, XdpCost, ratio},
};

/// Everything one `cargo xtask bench` run measured.
pub struct Reports {
    pub started: SystemTime,
    /// `/proc/loadavg` before the first benchmark and after the last.
    pub load_before: String,
    pub load_after: String,
    pub bgp: BgpReport,
    pub nat: NatReport,
    pub memory: MemoryReport,
}

/// The first three fields of `/proc/loadavg` (1, 5 and 15 minutes).
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Writes `docs/benchmarks.md` and the charts; returns the Markdown file's path.
pub fn write(reports: &Reports) -> Result<PathBuf> {
    let docs = workspace_root().join("docs");
    let img = docs.join("img");
    std::fs::create_dir_all(&img).with_context(|| format!("creating {}", img.display()))?;
    convergence_chart(&img.join("bgp-convergence.svg"), &reports.bgp)?;
    nat_chart(&img.join("nat-rounds.svg"), &reports.nat)?;
    memory_chart(&img.join("memory.svg"), &reports.memory)?;
    let path = docs.join("benchmarks.md");
    // `bench api` needs a baseline build and runs on its own: its part is kept as it was.
    let old = std::fs::read_to_string(&path).unwrap_or_default();
    let mut md = markdown(reports, &Machine::read(), hand_written(&old));
    if let Some(api) = api_part(&old) {
        md = with_api_part(&md, api);
    }
    std::fs::write(&path, md).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// The heading of the `bench api` part of `docs/benchmarks.md`.
const API_HEADING: &str = "## API (`cargo xtask bench api`)";

/// Writes the `bench api` part of `docs/benchmarks.md` (and its chart), leaving the rest of
/// the file as it is; returns the file's path.
pub fn write_api(api: &ApiReport) -> Result<PathBuf> {
    let docs = workspace_root().join("docs");
    let img = docs.join("img");
    std::fs::create_dir_all(&img).with_context(|| format!("creating {}", img.display()))?;
    api_chart(&img.join("api.svg"), api)?;
    let path = docs.join("benchmarks.md");
    let old = std::fs::read_to_string(&path).unwrap_or_default();
    let mut part = String::new();
    api_section(&mut part, api);
    std::fs::write(&path, with_api_part(&old, &part))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// The `bench api` part of `md`: its heading up to the next `## ` heading.
fn api_part(md: &str) -> Option<&str> {
    let start = md.find(API_HEADING)?;
    let rest = &md[start + API_HEADING.len()..];
    let end = rest
        .find("\n## ")
        .map_or(md.len(), |e| start + API_HEADING.len() + e + 1);
    Some(&md[start..end])
}

/// `md` with its `bench api` part replaced by `part`, or `part` added before "Reproduce".
fn with_api_part(md: &str, part: &str) -> String {
    if let Some(old) = api_part(md) {
        return md.replacen(old, part, 1);
    }
    let at = md.find("## Reproduce").unwrap_or(md.len());
    format!("{}{part}{}", &md[..at], &md[at..])
}

fn api_section(md: &mut String, api: &ApiReport) {
    let _ = writeln!(md, "{API_HEADING}\n");
    let _ = writeln!(
        md,
        "{} concurrent HTTP clients, each on a keepalive connection, against an agent whose\n\
         registry (and state file) already holds the other apps of the size; without and with\n\
         iptables NAT (`dataplane.mode: iptables`, one `ip6tables` DNAT rule per app). A\n\
         registration is answered once saved (durable); **installed** is from the first\n\
         registration until every VIP is on `lo` with its rule; an unregistration is answered\n\
         once its VIP and rule are gone. **agent CPU** is the agent's user + system time during\n\
         the registrations (installs running meanwhile included) and during the unregistrations,\n\
         per request: the cost of a request whatever else loads the machine. **baseline** is the\n\
         agent given with `--baseline`,\n\
         measured in the same run. **host floor** is the same removals by the host's tools alone,\n\
         in the same run (`ip -batch` deleting the VIPs one by one; with NAT also\n\
         `ip6tables-restore --noflush` deleting the rules a batch of clients at a time): what any\n\
         agent that answers after the removal can reach. Targets (issue 14): ≥ 10,000/s without\n\
         NAT and ≥ 5,000/s with iptables NAT, registrations and unregistrations, up to 10,000\n\
         apps.\n",
        api.clients
    );
    md.push_str(
        "| apps | NAT | agent | requests | registrations/s | installed/s | unregistrations/s | host floor/s | agent CPU µs per registration / unregistration |\n\
         | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for row in &api.rows {
        let ratio = |new: f64, old: Option<f64>| match (row.agent, old) {
            ("new", Some(old)) => format!(" ({:.1}×)", new / old),
            _ => String::new(),
        };
        let base = api.baseline_of(row);
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {:.0}{} | {:.0}{} | {:.0}{} | {} | {:.0}{} / {:.0}{} |",
            row.apps,
            if row.nat { "iptables" } else { "none" },
            row.agent,
            row.requests,
            row.register,
            ratio(row.register, base.map(|b| b.register)),
            row.installed,
            ratio(row.installed, base.map(|b| b.installed)),
            row.unregister,
            ratio(row.unregister, base.map(|b| b.unregister)),
            row.floor.map_or_else(String::new, |f| format!("{f:.0}")),
            row.register_cpu_us,
            ratio(row.register_cpu_us, base.map(|b| b.register_cpu_us)),
            row.unregister_cpu_us,
            ratio(row.unregister_cpu_us, base.map(|b| b.unregister_cpu_us)),
        );
    }
    for failed in &api.failed {
        let _ = writeln!(md, "\nBaseline without a figure: {failed}.");
    }
    md.push('\n');
    table(md, &api.summary);
    let _ = writeln!(
        md,
        "![Registrations and unregistrations per second, log scale](img/api.svg)\n"
    );
}

/// One figure of a `bench api` row.
type ApiFigure = fn(&super::api::ApiRow) -> f64;

/// Requests per second per round, on a log scale (log10 drawn linearly, labelled as rates).
fn api_chart(path: &Path, api: &ApiReport) -> Result<()> {
    let root = SVGBackend::new(path, (800, 400)).into_drawing_area();
    root.fill(&WHITE)?;
    let rounds: Vec<(u32, bool)> = api
        .rows
        .iter()
        .filter(|r| r.agent == "new")
        .map(|r| (r.apps, r.nat))
        .collect();
    let top = api
        .rows
        .iter()
        .flat_map(|r| [r.register, r.unregister])
        .fold(10.0_f64, f64::max)
        .log10()
        + 0.3;
    let labels: Vec<String> = rounds
        .iter()
        .map(|(apps, nat)| format!("{apps} apps, {}", if *nat { "NAT" } else { "no NAT" }))
        .collect();
    let mut chart = category_chart(
        &root,
        "API requests per second (log scale)",
        labels.len(),
        60,
        1.0..top,
    )?;
    chart
        .configure_mesh()
        .x_labels(labels.len())
        .x_label_formatter(&|x| category_label(&labels, *x))
        .y_label_formatter(&|y| format!("{:.0}", 10f64.powf(*y)))
        .y_desc("requests/s")
        .draw()?;
    let series: [(&str, &str, RGBColor, ApiFigure); 4] = [
        ("registrations", "new", BLUE, |r| r.register),
        ("unregistrations", "new", RED, |r| r.unregister),
        ("registrations, baseline", "baseline", GREEN, |r| r.register),
        ("unregistrations, baseline", "baseline", MAGENTA, |r| {
            r.unregister
        }),
    ];
    for (name, agent, colour, value) in series {
        let points: Vec<(f64, f64)> = rounds
            .iter()
            .zip(0u32..)
            .filter_map(|(&(apps, nat), i)| {
                api.rows
                    .iter()
                    .find(|r| r.agent == agent && r.apps == apps && r.nat == nat)
                    .map(|r| (f64::from(i), value(r).max(1.0).log10()))
            })
            .collect();
        if !points.is_empty() {
            marked_line(&mut chart, points, colour, name)?;
        }
    }
    legend(&mut chart, SeriesLabelPosition::LowerLeft)?;
    root.present()?;
    Ok(())
}

/// The machine the figures come from, from `/proc`.
struct Machine {
    cpu: String,
    cores: usize,
    kernel: String,
    ram_kib: u64,
}

impl Machine {
    fn read() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        Self {
            cpu: cpuinfo
                .lines()
                .find_map(|l| l.strip_prefix("model name"))
                .and_then(|l| l.split_once(':'))
                .map_or_else(|| "unknown".to_owned(), |(_, v)| v.trim().to_owned()),
            cores: cpuinfo
                .lines()
                .filter(|l| l.starts_with("processor"))
                .count(),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
            ram_kib: meminfo
                .lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0),
        }
    }
}

/// The commit the benchmarked tree is at (`+` when it has uncommitted changes).
fn commit() -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(workspace_root())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let hash = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".to_owned());
    let dirty = git(&["status", "--porcelain"]).is_some_and(|s| !s.is_empty());
    if dirty { format!("{hash}+") } else { hash }
}

/// The heading that starts the hand-written part of `docs/benchmarks.md` (findings, what was
/// tried): kept as it is when the file is written again, up to the next `## ` heading.
const HAND_WRITTEN: &str = "## Where the time and memory go";

/// The hand-written part of `old`, empty if it has none.
fn hand_written(old: &str) -> &str {
    let Some(start) = old.find(HAND_WRITTEN) else {
        return "";
    };
    // Up to the next part (`### ` subsections belong to it).
    let end = old[start..]
        .find("\n## ")
        .map_or(old.len(), |e| start + e + 1);
    &old[start..end]
}

fn markdown(r: &Reports, machine: &Machine, hand_written: &str) -> String {
    let mut md = String::new();
    let date = humantime::format_rfc3339_seconds(r.started);
    let load1: f64 = r
        .load_before
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let _ = writeln!(
        md,
        "# Benchmarks\n\n\
         Written by `cargo xtask bench` (as root: everything runs in network namespaces), which runs\n\
         `bench bgp`, `bench nat` and `bench memory` with their defaults. Figures from commit `{}`,\n\
         started {date}.\n\n\
         | machine | |\n| --- | --- |\n| CPU | {} |\n| cores | {} |\n| kernel | {} |\n| RAM | {:.1} GiB |\n\
         | load average (1, 5, 15 min) before / after | {} / {} |\n",
        commit(),
        machine.cpu,
        machine.cores,
        machine.kernel,
        // A GiB count far below 2^52.
        u32::try_from(machine.ram_kib / 1024).map_or(0.0, f64::from) / 1024.0,
        r.load_before,
        r.load_after,
    );
    #[expect(clippy::cast_precision_loss, reason = "a core count")]
    let busy = load1 > 0.25 * machine.cores as f64;
    if busy {
        let _ = writeln!(
            md,
            "**Noisy run:** the machine was busy before the benchmarks started (1-minute load\n\
             {load1:.2} on {} cores: other work shared it), so absolute figures are low and vary;\n\
             the ratios compare runs taken side by side and are the figures to read. Re-run on an\n\
             idle machine for absolute numbers.\n",
            machine.cores
        );
    }

    bgp_section(&mut md, &r.bgp);
    nat_section(&mut md, &r.nat);
    memory_section(&mut md, &r.memory);
    md.push_str(hand_written);
    let _ = writeln!(
        md,
        "## Reproduce\n\n```sh\ncargo xtask bench            # all three, rewrites this file and docs/img/*.svg\n\
         cargo xtask bench bgp --help # each target's options\ncargo xtask bench nat --only xdp\n\
         # the api part alone, beside a release build of the commit before as the baseline:\n\
         git archive bcd9fcc | tar -x -C /tmp/base && (cd /tmp/base && cargo build --release -p gocast-agent)\n\
         cargo xtask bench api --baseline /tmp/base/target/release/gocast\n```"
    );
    md
}

fn bgp_section(md: &mut String, bgp: &BgpReport) {
    let _ = writeln!(md, "## BGP (`cargo xtask bench bgp`)\n");
    let _ = writeln!(
        md,
        "The agent against BIRD 2 in a namespace. Convergence: a service behind a `port:tcp` monitor\n\
         (`monitor_interval` {} ms) is killed; the time until its route leaves the router's kernel\n\
         table, {} trials. Silence: the agent is frozen (SIGSTOP, TCP left open) with BFD on the\n\
         session (300 ms × 3, hold time 90 s) and without (hold time 9 s); the time until its route\n\
         leaves the router's kernel table.\n",
        bgp.interval.as_millis(),
        bgp.convergence.len()
    );
    table(md, &bgp.summary);
    let _ = writeln!(
        md,
        "![Withdraw convergence: trials per 10 ms bucket](img/bgp-convergence.svg)\n"
    );
}

fn nat_section(md: &mut String, nat: &NatReport) {
    let _ = writeln!(md, "## NAT (`cargo xtask bench nat`)\n");
    let _ = writeln!(
        md,
        "`wrk` in a client namespace against a small HTTP service in the agent's namespace, over a\n\
         veth link: **direct** (no agent, the service's own address), **eBPF** and **iptables**\n\
         (the VIP, NATed by the agent in that `dataplane.mode`; on a veth `dataplane.ingress:\n\
         auto` runs the ingress program at TC, see the README), and as a control **eBPF attached,\n\
         no NAT** (a port of the service no rule maps, in the eBPF lab: the programs run but\n\
         rewrite nothing). Short = `Connection: close`, a new connection per request. Rounds run\n\
         back to back without a reset, so conntrack entries pile up in the iptables lab. Targets\n\
         (issue #5): eBPF ≥ 0.95 × direct in every round, short and keepalive. When the control\n\
         is about as low as eBPF, the cost is in having the programs on this link, not in the NAT.\n"
    );
    md.push_str(
        "| round | connections | direct req/s | eBPF req/s | iptables req/s | eBPF attached, no NAT | eBPF / direct | eBPF / iptables | conntrack entries (iptables lab) |\n\
         | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for (i, round) in nat.rounds.iter().enumerate() {
        for (k, kind) in Kind::ALL.into_iter().enumerate() {
            let [direct, ebpf, iptables, no_nat] = round.rps[k];
            let e = ratio(ebpf, direct);
            let _ = writeln!(
                md,
                "| {} | {} | {direct:.0} | {ebpf:.0} | {iptables:.0} | {no_nat:.0} | {e:.3} {} | {:.3} | {} |",
                i + 1,
                kind.name(),
                if e >= 0.95 { "PASS" } else { "FAIL" },
                ratio(ebpf, iptables),
                round.conntrack.map_or_else(String::new, |n| n.to_string()),
            );
        }
    }
    attribution_table(md, &nat.attribution);
    xdp_table(md, nat);
    let _ = writeln!(
        md,
        "\n![Requests per second per round](img/nat-rounds.svg)\n"
    );
}

/// The `xdp` part: each packet's cost in `BPF_PROG_TEST_RUN`.
fn xdp_table(md: &mut String, nat: &NatReport) {
    if let Some(x) = nat.xdp {
        let _ = writeln!(
            md,
            "\nThe packet programs alone, `BPF_PROG_TEST_RUN` with a repeat count of millions (median\n\
             of 5 batches; the kernel reports the mean time per run, harness included). Target:\n\
             ≤ 100 ns for a packet the NAT rewrites (XDP).{}\n",
            if nat.compared.is_some() {
                " The last column: the `--compare` object, its batches alternating with these."
            } else {
                ""
            }
        );
        let c = nat.compared;
        let col = |f: Figure| {
            c.as_ref()
                .map_or_else(String::new, |c| format!(" {:.1} |", f(c)))
        };
        let head = if c.is_some() { " compared |" } else { "" };
        let rule = if c.is_some() { " ---: |" } else { "" };
        let _ = writeln!(md, "| packet | ns per packet |{head}\n| --- | ---: |{rule}");
        let rows: [(&str, Figure); 8] = [
            (
                "XDP: TCP to a VIP port with a NAT rule (counted, rewritten, flow known)",
                |x| x.rewrite,
            ),
            ("XDP: TCP to a VIP port without a rule (counted)", |x| {
                x.vip_only
            }),
            ("XDP: TCP to an address that is no VIP", |x| x.other),
            (
                "TC ingress: TCP of a known NATed flow (counted, rewritten)",
                |x| x.tc_rewrite,
            ),
            ("TC egress: its reply (VIP restored, counted)", |x| {
                x.tc_reverse
            }),
            ("TC egress: TCP from a port no rule targets", |x| x.tc_other),
            (
                "XDP: SYN of a new connection, flow maps full (one run per call)",
                |x| x.syn,
            ),
            ("TC ingress: the same SYN", |x| x.tc_syn),
        ];
        for (i, (label, f)) in rows.into_iter().enumerate() {
            let verdict = match i {
                0 if x.rewrite <= 100.0 => " PASS",
                0 => " FAIL",
                _ => "",
            };
            let _ = writeln!(md, "| {label} | {:.1}{verdict} |{}", f(&x), col(f));
        }
        if let Some(floor) = nat.floor {
            let _ = writeln!(
                md,
                "\nThe floor, a program that only returns its verdict, on the same frame: XDP \
                 {:.1} ns, TC {:.1} ns. The XDP NAT rewrite is {:.1} ns above it. The SYNs are \
                 timed one run per call, where the XDP floor is {:.1} ns.",
                floor.xdp,
                floor.tc,
                x.rewrite - floor.xdp,
                floor.single
            );
        }
    }
}

/// One figure of an [`XdpCost`].
type Figure = fn(&XdpCost) -> f64;

/// The attribution runs: per program, runs and time with the kernel's statistics on.
fn attribution_table(md: &mut String, runs: &[Attribution]) {
    if runs.is_empty() {
        return;
    }
    md.push_str(
        "\nWhere the time goes: one more `wrk` run per kind in the eBPF lab, with the kernel's\n\
         program statistics on (`BPF_ENABLE_STATS`; each run then also pays two clock reads, so\n\
         these rates are a little lower than the rounds'). Per program: runs per second, mean ns\n\
         per run, and the time in it as a share of one core.\n\n\
         | connections | mode | req/s | program | runs/s | ns/run | % of a core |\n\
         | --- | --- | ---: | --- | ---: | ---: | ---: |\n",
    );
    for run in runs {
        for p in &run.programs {
            let _ = writeln!(
                md,
                "| {} | {} | {:.0} | {} | {:.0} | {:.1} | {:.2} |",
                run.kind.name(),
                run.mode.name(),
                run.rps,
                p.name,
                p.runs_per_s,
                p.ns_per_run,
                p.core_pct
            );
        }
    }
}

fn memory_section(md: &mut String, memory: &MemoryReport) {
    let _ = writeln!(md, "## Memory (`cargo xtask bench memory`)\n");
    let _ = writeln!(
        md,
        "The agent with N apps (IPv6 /128 VIPs), each with a `port:tcp` monitor on a listening\n\
         port, so all are healthy, on `lo` and announced to BIRD; memory read {} s after BIRD\n\
         holds every route (`--settle-s`); CPU over the next seconds of steady state (each app checked\n\
         once a second), in % of one core (GoCast: 5.6 % with 1,000 apps; target ≤ 0.5 %);\n\
         \"touched\" is the part of VmRSS accessed during those seconds (the steady state's working set).\n\n\
         | apps | VmRSS MiB | of it anonymous / file-backed MiB | of it touched MiB | VmHWM (peak) MiB | CPU % of a core | spawn → all routes at BIRD |\n| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        memory.settle_s
    );
    for row in &memory.rows {
        let _ = writeln!(
            md,
            "| {} | {} | {} / {} | {} | {} | {:.2} | {} ms |",
            row.apps,
            mib(row.rss_kib),
            mib(row.anon_kib),
            mib(row.file_kib),
            mib(row.working_kib),
            mib(row.hwm_kib),
            row.cpu_pct,
            ms(row.all_at_bird)
        );
    }
    let _ = writeln!(
        md,
        "\n![Resident memory against app count](img/memory.svg)\n"
    );
}

/// A summary as a Markdown table.
fn table(md: &mut String, summary: &Summary) {
    md.push_str("| figure | value | target | |\n| --- | ---: | --- | --- |\n");
    for [name, value, target, verdict] in summary.rows() {
        let _ = writeln!(md, "| {} | {value} | {target} | {verdict} |", name.trim());
    }
    md.push('\n');
}

/// Colours of the NAT modes, in [`Mode::ALL`] order.
const MODE_COLOURS: [RGBColor; 4] = [BLACK, BLUE, RED, GREEN];

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

fn convergence_chart(path: &Path, bgp: &BgpReport) -> Result<()> {
    const BUCKET_MS: u64 = 10;
    let mut counts = Vec::new();
    for d in &bgp.convergence {
        let bucket = usize::try_from(millis(*d) / BUCKET_MS).unwrap_or(usize::MAX);
        if counts.len() <= bucket {
            counts.resize(bucket + 1, 0u32);
        }
        counts[bucket] += 1;
    }
    let root = SVGBackend::new(path, (800, 400)).into_drawing_area();
    root.fill(&WHITE)?;
    let max_x = (counts.len().max(1) as u64 * BUCKET_MS).max(100);
    let max_y = counts.iter().copied().max().unwrap_or(1).max(1) + 1;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "Withdraw convergence, {} trials (monitor_interval {} ms)",
                bgp.convergence.len(),
                bgp.interval.as_millis()
            ),
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0..max_x, 0..max_y)?;
    chart
        .configure_mesh()
        .x_desc("kill → route gone from the router's kernel table (ms)")
        .y_desc("trials")
        .draw()?;
    chart.draw_series(counts.iter().enumerate().map(|(i, &n)| {
        let x0 = i as u64 * BUCKET_MS;
        Rectangle::new([(x0, 0), (x0 + BUCKET_MS, n)], BLUE.mix(0.6).filled())
    }))?;
    root.present()?;
    Ok(())
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn nat_chart(path: &Path, nat: &NatReport) -> Result<()> {
    let root = SVGBackend::new(path, (1000, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, 2));
    for (k, kind) in Kind::ALL.into_iter().enumerate() {
        nat_panel(&panels[k], nat, k, kind)?;
    }
    root.present()?;
    Ok(())
}

fn nat_panel(area: &Area<'_>, nat: &NatReport, k: usize, kind: Kind) -> Result<()> {
    let rounds = u32::try_from(nat.rounds.len()).unwrap_or(u32::MAX).max(1);
    let max_y = nat.rounds.iter().flat_map(|r| r.rps[k]).fold(1.0, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!("{} — req/s per round", kind.name()),
            ("sans-serif", 18),
        )
        .margin(15)
        .x_label_area_size(35)
        .y_label_area_size(65)
        .build_cartesian_2d(0.5..f64::from(rounds) + 0.5, 0.0..max_y)?;
    chart
        .configure_mesh()
        .x_labels(nat.rounds.len())
        .x_label_formatter(&|x| format!("round {x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .y_desc("requests/s")
        .draw()?;
    for (m, mode) in Mode::ALL.into_iter().enumerate() {
        let colour = MODE_COLOURS[m];
        let points: Vec<(f64, f64)> = nat
            .rounds
            .iter()
            .zip(1u32..)
            .map(|(r, i)| (f64::from(i), r.rps[k][m]))
            .collect();
        marked_line(&mut chart, points, colour, mode.name())?;
    }
    legend(&mut chart, SeriesLabelPosition::LowerRight)
}

/// A chart with `f64` axes on an SVG drawing area, as the line charts here draw.
type LineChart<'a, 'b> =
    ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// A line through `points` with each point marked, labelled for the legend.
fn marked_line(
    chart: &mut LineChart<'_, '_>,
    points: Vec<(f64, f64)>,
    colour: RGBColor,
    label: &str,
) -> Result<()> {
    chart
        .draw_series(LineSeries::new(points.clone(), colour.stroke_width(2)))?
        .label(label)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour));
    chart.draw_series(
        points
            .into_iter()
            .map(|p| Circle::new(p, 4, colour.filled())),
    )?;
    Ok(())
}

/// A line chart on `root` with `categories` places along x, at 0, 1, ..., each half a place
/// from the edges; its labels come from [`category_label`].
fn category_chart<'a, 'b>(
    root: &'a Area<'b>,
    caption: &str,
    categories: usize,
    y_label_area: u32,
    y: Range<f64>,
) -> Result<LineChart<'a, 'b>> {
    let n = u32::try_from(categories).unwrap_or(u32::MAX).max(1);
    Ok(ChartBuilder::on(root)
        .caption(caption, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(y_label_area)
        .build_cartesian_2d(-0.5..f64::from(n) - 0.5, y)?)
}

/// The label of the category at `x`, nothing between categories (plotters asks at any x).
fn category_label(labels: &[String], x: f64) -> String {
    let i = x.round();
    if (x - i).abs() > 0.01 || i < 0.0 {
        return String::new();
    }
    // A small index, rounded above.
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "an index"
    )]
    labels.get(i as usize).cloned().unwrap_or_default()
}

/// The legend of the lines drawn, at `position`.
fn legend<'a, 'b: 'a>(chart: &mut LineChart<'a, 'b>, position: SeriesLabelPosition) -> Result<()> {
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

fn memory_chart(path: &Path, memory: &MemoryReport) -> Result<()> {
    let root = SVGBackend::new(path, (800, 400)).into_drawing_area();
    root.fill(&WHITE)?;
    let rows = &memory.rows;
    let max_y = rows.iter().map(|r| r.hwm_kib).max().map_or(1.0, |k| {
        u32::try_from(k / 1024).map_or(1.0, f64::from) + 1.0
    }) * 1.15;
    let labels: Vec<String> = rows.iter().map(|r| r.apps.to_string()).collect();
    let mut chart = category_chart(
        &root,
        "Agent memory against app count",
        labels.len(),
        50,
        0.0..max_y,
    )?;
    chart
        .configure_mesh()
        .x_labels(labels.len())
        .x_label_formatter(&|x| category_label(&labels, *x))
        .x_desc("apps (port:tcp monitors, announced)")
        .y_desc("MiB")
        .draw()?;
    let series = [
        (
            "VmRSS",
            BLUE,
            rows.iter().map(|r| r.rss_kib).collect::<Vec<_>>(),
        ),
        (
            "VmHWM (peak)",
            MAGENTA,
            rows.iter().map(|r| r.hwm_kib).collect(),
        ),
    ];
    for (name, colour, kib) in series {
        let points: Vec<(f64, f64)> = kib
            .iter()
            .zip(0u32..)
            .map(|(&k, i)| (f64::from(i), kib_to_mib(k)))
            .collect();
        marked_line(&mut chart, points, colour, name)?;
    }
    legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
    root.present()?;
    Ok(())
}

fn kib_to_mib(kib: u64) -> f64 {
    u32::try_from(kib).map_or(f64::MAX, f64::from) / 1024.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::{memory::MemoryRow, nat::Round};

    fn sample() -> Reports {
        Reports {
            started: SystemTime::now(),
            load_before: "3.10 2.00 1.00".to_owned(),
            load_after: "2.00 2.00 1.00".to_owned(),
            bgp: BgpReport {
                convergence: (0..100).map(|i| Duration::from_millis(60 + i)).collect(),
                interval: Duration::from_millis(100),
                summary: Summary::default(),
            },
            nat: NatReport {
                rounds: vec![
                    Round {
                        rps: [[100.0, 96.0, 90.0, 98.0], [1000.0, 990.0, 980.0, 995.0]],
                        conntrack: Some(5),
                    };
                    3
                ],
                attribution: Vec::new(),
                xdp: None,
                compared: None,
                floor: None,
                summary: Summary::default(),
            },
            memory: MemoryReport {
                settle_s: 45,
                rows: [0, 100, 1000, 10_000]
                    .into_iter()
                    .map(|apps| MemoryRow {
                        apps,
                        rss_kib: 6000 + u64::from(apps),
                        hwm_kib: 7000 + u64::from(apps),
                        anon_kib: 1000,
                        file_kib: 5000 + u64::from(apps),
                        working_kib: 3000,
                        all_at_bird: Duration::from_millis(10),
                        cpu_pct: 0.1,
                    })
                    .collect(),
                summary: Summary::default(),
            },
        }
    }

    #[test]
    fn markdown_has_every_section_and_flags_a_busy_machine() {
        let machine = Machine {
            cpu: "Test CPU".to_owned(),
            cores: 2,
            kernel: "6.1".to_owned(),
            ram_kib: 4 * 1024 * 1024,
        };
        let kept = "## Where the time and memory go (notes)\n\nKept.\n\n";
        let old = format!("# Benchmarks\n\nold figures\n\n{kept}## Reproduce\n\nold\n");
        assert_eq!(hand_written(&old), kept);
        assert_eq!(hand_written("# Benchmarks\n"), "");
        let md = markdown(&sample(), &machine, hand_written(&old));
        for needle in [
            "| CPU | Test CPU |",
            "| RAM | 4.0 GiB |",
            "**Noisy run:**",
            "| 3 | keepalive | 1000 | 990 | 980 | 995 | 0.990 PASS | 1.010 | 5 |",
            "| 10000 | 15.6 | 1.0 / 14.6 | 2.9 | 16.6 | 0.10 | 10.0 ms |",
            "img/bgp-convergence.svg",
            "img/nat-rounds.svg",
            "img/memory.svg",
            "Kept.\n\n## Reproduce",
        ] {
            assert!(md.contains(needle), "{needle:?} missing in:\n{md}");
        }
    }

    #[test]
    fn charts_render_as_svg() {
        let dir = tempfile::tempdir().unwrap();
        let r = sample();
        convergence_chart(&dir.path().join("c.svg"), &r.bgp).unwrap();
        nat_chart(&dir.path().join("n.svg"), &r.nat).unwrap();
        memory_chart(&dir.path().join("m.svg"), &r.memory).unwrap();
        for f in ["c.svg", "n.svg", "m.svg"] {
            let svg = std::fs::read_to_string(dir.path().join(f)).unwrap();
            assert!(svg.starts_with("<svg"), "{f}");
            assert!(svg.contains("<text"), "{f} has no labels");
        }
    }
}
