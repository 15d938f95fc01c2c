//! The process's own resources, under the names every Prometheus client
//! library uses (`process_*`), so that dashboards built for them work: read
//! from `/proc/self` on Linux at each upkeep; absent elsewhere.

use metrics::{Counter, Gauge};

use crate::metrics::Registry;

/// The process collector's handles.
#[derive(Debug, Clone)]
pub struct ProcessMetrics {
    cpu_seconds: Counter,
    resident_bytes: Gauge,
    virtual_bytes: Gauge,
    open_fds: Gauge,
    max_fds: Gauge,
    start_time: Gauge,
}

/// Clock ticks per second of `/proc/self/stat` (`_SC_CLK_TCK` is 100 on
/// every Linux the proxy targets).
const TICKS_PER_SECOND: u64 = 100;

impl ProcessMetrics {
    /// Registers the collector's metrics.
    pub fn new(registry: &Registry) -> Self {
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let this = Self {
            cpu_seconds: registry.counter("process_cpu_seconds_total", &[]),
            resident_bytes: registry.gauge("process_resident_memory_bytes", &[]),
            virtual_bytes: registry.gauge("process_virtual_memory_bytes", &[]),
            open_fds: registry.gauge("process_open_fds", &[]),
            max_fds: registry.gauge("process_max_fds", &[]),
            start_time: registry.gauge("process_start_time_seconds", &[]),
        };
        this.start_time.set(start);
        this
    }

    /// Reads `/proc/self` once.
    pub fn update(&self) {
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat")
            && let Some((ticks, vsize, rss_pages)) = parse_stat(&stat)
        {
            // Whole seconds (the counter is an integer): enough for rate()
            // over minutes.
            self.cpu_seconds.absolute(ticks / TICKS_PER_SECOND);
            self.virtual_bytes.set(vsize as f64);
            self.resident_bytes.set((rss_pages * 4096) as f64);
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            self.open_fds.set(fds.count() as f64);
        }
        if let Ok(limits) = std::fs::read_to_string("/proc/self/limits")
            && let Some(max) = limits
                .lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|v| v.parse::<f64>().ok())
        {
            self.max_fds.set(max);
        }
    }
}

/// (utime + stime in ticks, virtual bytes, resident pages) from
/// `/proc/self/stat`, whose second field (the name) may hold spaces.
fn parse_stat(stat: &str) -> Option<(u64, u64, u64)> {
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields after the name, from field 3 (state) on: utime is 14, stime 15,
    // vsize 23, rss 24 (proc(5)), so indices 11, 12, 20, 21 here.
    let num = |i: usize| fields.get(i)?.parse::<u64>().ok();
    Some((num(11)? + num(12)?, num(20)?, num(21)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_proc_stat_with_a_name_holding_spaces() {
        let stat = "42 (sluice gate) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 \
                    1000 123456789 2048 18446744073709551615";
        assert_eq!(parse_stat(stat), Some((300, 123_456_789, 2048)));
    }

    #[test]
    fn reads_this_process() {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
        let (_, vsize, rss) = parse_stat(&stat).unwrap();
        assert!(vsize > 0 && rss > 0);
    }
}
