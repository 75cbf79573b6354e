//! What a process has used of the machine, read from `/proc` (Linux; `None`
//! elsewhere): CPU time, to tell whether a run is limited by the cores or by
//! waiting, and resident memory.

use std::time::Duration;

/// User plus system CPU time of process `pid` so far.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    parse_cpu(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// `utime` and `stime` are the 14th and 15th fields, in clock ticks of 1/100 s
/// (`USER_HZ`, fixed by the kernel's ABI). The command name, the 2nd field, is
/// in parentheses and may hold spaces, so fields are counted after its `)`.
fn parse_cpu(stat: &str) -> Option<Duration> {
    let mut fields = stat
        .get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some(Duration::from_millis((user + system) * 10))
}

/// The highest resident set size of process `pid` so far (`VmHWM`), in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    status_field(pid, "VmHWM:")
}

/// The resident set size of process `pid` now (`VmRSS`), in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_field(pid, "VmRSS:")
}

fn status_field(pid: u32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_read_after_the_command_name() {
        let stat = "42 (read heavy) R 1 42 42 0 -1 4194304 98 0 0 0 250 130 0 0 20 0 3 0";
        assert_eq!(parse_cpu(stat), Some(Duration::from_millis(3800)));
        assert_eq!(parse_cpu("42 (x) R 1"), None);
    }

    #[test]
    fn this_process_has_used_some_cpu_and_memory() {
        let me = std::process::id();
        assert!(cpu_time(me).is_some());
        let (now, peak) = (rss_kib(me).unwrap(), peak_rss_kib(me).unwrap());
        assert!(now > 0 && peak >= now, "{now} KiB now, {peak} KiB at most");
    }
}
