//! Profiling L1 while a benchmark runs: Linux's `perf` (Debian's `linux-perf`, the host's
//! binary with its libraries, like dnsmasq) samples both of L1's CPUs while the guests
//! measure, then prints where L1's time went as `LAB-PERF` lines ([`REPORTS`]). It answers
//! "which VMM spends L1's CPU where" for benchmarks whose ratios are off. Samples taken
//! while L1 ran an L2 guest are not in the reports. Opt-in (`VIRIDIAN_LAB_PERF=1`); CI never
//! profiles.

/// The environment variable that turns profiling on for the lab's benchmarks.
pub const ENV: &str = "VIRIDIAN_LAB_PERF";

/// Whether profiling was asked for.
pub fn wanted() -> bool {
    std::env::var_os(ENV).is_some_and(|v| !v.is_empty() && v != "0")
}

/// The marker [`wrap`] puts in a script, by which the lab knows to carry `perf` into L1.
const MARKER: &str = "perf record";

/// Whether a scenario's script profiles (so L1 carries `perf`).
pub(crate) fn used_by(script: Option<&str>) -> bool {
    script.is_some_and(|s| s.contains(MARKER))
}

/// How many lines of each report to print.
const REPORT_LINES: usize = 40;

/// The reports: time by thread; by thread and whether in the kernel, the VMM or a library;
/// by thread and function.
const REPORTS: &[&str] = &["comm", "comm,dso", "comm,sym"];

/// The sample file of the profile `name`, in L1.
fn data(name: &str) -> String {
    format!("/tmp/{name}.perf")
}

/// Shell: start sampling both of L1's CPUs into `name`'s data file, in the background
/// (`$perf_pid`), for `seconds` or, with `None`, until [`report`] stops it.
pub fn record(name: &str, seconds: Option<u32>) -> String {
    let until = seconds
        .map(|s| format!(" -- sleep {s}"))
        .unwrap_or_default();
    format!(
        "echo 0 > /proc/sys/kernel/kptr_restrict; echo -1 > /proc/sys/kernel/perf_event_paranoid; \
         {MARKER} -a -F 499 -q -o {data}{until} & perf_pid=$!; ",
        data = data(name)
    )
}

/// Shell: stop (if it still runs) and wait for the sampling [`record`] started, then print
/// the reports as `LAB-PERF name sort ...` lines and delete the data.
pub fn report(name: &str) -> String {
    let data = data(name);
    let reports = REPORTS.join(" ");
    format!(
        "kill -INT $perf_pid 2>/dev/null; wait $perf_pid; \
         for s in {reports}; do \
           perf report -i {data} --stdio --sort $s --percent-limit 0.3 2>/dev/null | grep -v '^#' | grep -v '^$' | head -{REPORT_LINES} | sed \"s/^/LAB-PERF {name} $s /\"; \
         done; rm -f {data}; "
    )
}

/// `command` (a shell command line, not `exec`ed), its console copied through, with L1
/// sampled for `seconds` from the first console line that holds `start` (the benchmark's
/// own start, so the guest's boot stays out of the profile); then the [`report`]. The
/// shell's exit status stays the command's.
pub fn wrap(name: &str, command: &str, start: &str, seconds: u32) -> String {
    let rc = format!("/tmp/{name}.rc");
    format!(
        "{{ {command}; echo $? > {rc}; }} | {{ while IFS= read -r l; do printf '%s\n' \"$l\"; \
           case \"$l\" in *{start}*) [ -n \"$perf_pid\" ] || {{ {record} }} ;; esac; \
         done; {report}}}; \
         rc=$(cat {rc}); rm -f {rc}; exit $rc",
        record = record(name, Some(seconds)),
        report = report(name),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wrapped_command_keeps_its_status_and_is_recognised() {
        let s = wrap("fio-x", "viridian run --disk /b/raw.img", "fio_dev=", 20);
        assert!(
            s.contains("{ viridian run --disk /b/raw.img; echo $? > /tmp/fio-x.rc; }"),
            "{s}"
        );
        assert!(
            s.contains("perf record -a -F 499 -q -o /tmp/fio-x.perf -- sleep 20 & perf_pid=$!;"),
            "{s}"
        );
        assert!(s.contains("wait $perf_pid"), "{s}");
        assert!(s.ends_with("exit $rc"), "{s}");
        assert!(s.contains("LAB-PERF fio-x $s"), "{s}");
        assert!(used_by(Some(&s)));
        assert!(!used_by(Some("exec viridian run")));
        assert!(!used_by(None));
        crate::network::tests::parses(&s);
        // Until stopped: no command.
        let r = record("net", None);
        assert!(r.contains("-o /tmp/net.perf & perf_pid=$!"), "{r}");
        crate::network::tests::parses(&format!("{r}{}", report("net")));
    }
}
