//! The standard Prometheus process metrics, read from Linux's `/proc` on
//! every scrape:
//!
//! | metric | type | source |
//! |---|---|---|
//! | `process_cpu_seconds_total` | counter | `/proc/self/stat` utime + stime, in clock ticks |
//! | `process_resident_memory_bytes` | gauge | `/proc/self/status` `VmRSS` (kB) |
//! | `process_virtual_memory_bytes` | gauge | `/proc/self/stat` vsize (bytes) |
//! | `process_open_fds` | gauge | entries of `/proc/self/fd` |
//! | `process_max_fds` | gauge | `/proc/self/limits` "Max open files", soft limit (left out when unlimited) |
//! | `process_start_time_seconds` | gauge | `/proc/stat` btime + `/proc/self/stat` starttime (clock ticks after boot) |
//!
//! Each value is read on its own: one that cannot be read (no `/proc`, as on
//! macOS, or a file the sandbox hides) is left out of the exposition; the
//! collector never fails a scrape and never panics.
//!
//! Clock ticks without `unsafe` (`libc::sysconf` cannot be called here:
//! `unsafe_code` is forbidden workspace-wide): `sysconf(_SC_CLK_TCK)` is the
//! `AT_CLKTCK` entry of the process's ELF auxiliary vector, which the kernel
//! sets to `CLOCKS_PER_SEC`, i.e. `USER_HZ`, the unit of the tick counts in
//! `/proc/<pid>/stat` (`create_elf_tables` in `fs/binfmt_elf.c`; see also
//! getauxval(3) and proc(5)). The same vector is readable as
//! `/proc/self/auxv`, so that is where the tick rate comes from. If it cannot
//! be read, 100 is assumed: `USER_HZ` is 100 in `include/asm-generic/param.h`,
//! which every architecture Rust's Linux targets run on uses (alpha, the
//! exception at 1024, is not one of them).

use std::path::{Path, PathBuf};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, EncodeMetric,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// `USER_HZ` when the auxiliary vector cannot be read.
const DEFAULT_CLOCK_TICKS: u64 = 100;
/// `AT_CLKTCK` in `include/uapi/linux/auxvec.h`.
const AT_CLKTCK: usize = 17;

/// Collects the process metrics on every scrape. Register it once, without
/// a prefix: `registry.register_collector(Box::new(ProcessCollector::new()))`.
#[derive(Debug, Clone)]
pub struct ProcessCollector {
    /// `/proc`, or a fake tree in tests.
    proc: PathBuf,
    /// Clock ticks per second of the counts in `stat`.
    clock_ticks: u64,
}

/// One reading of the process metrics; `None` where the value could not be
/// read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: Option<f64>,
    pub resident_memory_bytes: Option<u64>,
    pub virtual_memory_bytes: Option<u64>,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
    pub start_time_seconds: Option<f64>,
}

impl Default for ProcessCollector {
    fn default() -> Self {
        Self::new()
    }
}

impl ProcessCollector {
    /// A collector for this process (`/proc/self`).
    pub fn new() -> Self {
        Self::with_proc(Path::new("/proc"))
    }

    fn with_proc(proc: &Path) -> Self {
        let clock_ticks = std::fs::read(proc.join("self/auxv"))
            .ok()
            .and_then(|auxv| auxv_entry(&auxv, AT_CLKTCK))
            .and_then(|ticks| u64::try_from(ticks).ok())
            .filter(|&ticks| ticks > 0)
            .unwrap_or(DEFAULT_CLOCK_TICKS);
        ProcessCollector {
            proc: proc.to_owned(),
            clock_ticks,
        }
    }

    /// Reads the current values.
    pub fn read(&self) -> ProcessStats {
        let read = |path: &str| std::fs::read_to_string(self.proc.join(path)).ok();
        let stat = read("self/stat").as_deref().and_then(Stat::parse);
        let ticks = self.clock_ticks as f64;
        let boot_time = read("stat")
            .as_deref()
            .and_then(|s| field_after(s, "btime"));
        ProcessStats {
            cpu_seconds: stat.map(|s| (s.utime + s.stime) as f64 / ticks),
            resident_memory_bytes: read("self/status")
                .as_deref()
                .and_then(|s| field_after(s, "VmRSS:"))
                .map(|kb| kb.saturating_mul(1024)),
            virtual_memory_bytes: stat.map(|s| s.vsize),
            open_fds: std::fs::read_dir(self.proc.join("self/fd"))
                .ok()
                .map(|entries| entries.count() as u64),
            max_fds: read("self/limits")
                .as_deref()
                .and_then(|s| field_after(s, "Max open files")),
            start_time_seconds: match (boot_time, stat) {
                (Some(boot), Some(s)) => Some(boot as f64 + s.starttime as f64 / ticks),
                _ => None,
            },
        }
    }
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = self.read();
        if let Some(v) = stats.cpu_seconds {
            counter(
                &mut encoder,
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds.",
                v,
            )?;
        }
        let gauges = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                stats.resident_memory_bytes,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
                stats.virtual_memory_bytes,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors.",
                stats.open_fds,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors.",
                stats.max_fds,
            ),
        ];
        for (name, help, value) in gauges {
            if let Some(v) = value {
                gauge(&mut encoder, name, help, v)?;
            }
        }
        if let Some(v) = stats.start_time_seconds {
            gauge(
                &mut encoder,
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                v,
            )?;
        }
        Ok(())
    }
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: impl EncodeCounterValue,
) -> Result<(), std::fmt::Error> {
    let metric = ConstCounter::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: impl EncodeGaugeValue,
) -> Result<(), std::fmt::Error> {
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

/// The fields of `/proc/<pid>/stat` used here.
#[derive(Debug, Clone, Copy)]
struct Stat {
    utime: u64,
    stime: u64,
    starttime: u64,
    vsize: u64,
}

impl Stat {
    fn parse(text: &str) -> Option<Stat> {
        // `pid (comm) state ...`: comm may hold spaces and parentheses, so
        // the fields start after the last `)`. Numbering as in proc(5):
        // state is field 3.
        let (_, rest) = text.rsplit_once(')')?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
        Some(Stat {
            utime: field(14)?,
            stime: field(15)?,
            starttime: field(22)?,
            vsize: field(23)?,
        })
    }
}

/// The number after `label` on the line starting with it, as in
/// `VmRSS:   1234 kB`, `btime 1700000000` or
/// `Max open files   1024   4096   files` (the first number: the soft limit).
fn field_after(text: &str, label: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(label))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|value| value.parse().ok())
}

/// The value of entry `key` in an ELF auxiliary vector: pairs of native
/// words (type, value), ending with `AT_NULL`.
fn auxv_entry(auxv: &[u8], key: usize) -> Option<usize> {
    const WORD: usize = std::mem::size_of::<usize>();
    auxv.chunks_exact(2 * WORD).find_map(|pair| {
        let (k, v) = pair.split_at(WORD);
        let k = usize::from_ne_bytes(k.try_into().ok()?);
        let v = usize::from_ne_bytes(v.try_into().ok()?);
        (k == key).then_some(v)
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use prometheus_client::registry::Registry;

    #[test]
    fn reads_plausible_values_for_this_process() {
        if !Path::new("/proc/self/stat").exists() {
            eprintln!("no /proc here: nothing to read");
            return;
        }
        let collector = ProcessCollector::new();
        assert_eq!(collector.clock_ticks, 100, "USER_HZ on Linux");
        let stats = collector.read();
        assert!(
            stats.resident_memory_bytes.unwrap() > 1024 * 1024,
            "{stats:?}"
        );
        assert!(
            stats.virtual_memory_bytes.unwrap() >= stats.resident_memory_bytes.unwrap(),
            "{stats:?}"
        );
        assert!(stats.open_fds.unwrap() >= 3, "{stats:?}");
        assert!(
            stats.max_fds.unwrap() >= stats.open_fds.unwrap(),
            "{stats:?}"
        );
        assert!(stats.cpu_seconds.unwrap() >= 0.0, "{stats:?}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let start = stats.start_time_seconds.unwrap();
        assert!(
            start <= now + 1.0 && start > now - 3600.0,
            "{start} vs {now}"
        );

        let mut registry = Registry::default();
        registry.register_collector(Box::new(collector));
        let text = crate::encode(&registry).unwrap();
        for name in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_virtual_memory_bytes",
            "process_open_fds",
            "process_max_fds",
            "process_start_time_seconds",
        ] {
            let sample = text
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .unwrap_or_else(|| panic!("no {name} sample in:\n{text}"));
            let value: f64 = sample.parse().unwrap();
            if name == "process_cpu_seconds_total" {
                assert!(value >= 0.0, "{name} {value}");
            } else {
                assert!(value > 0.0, "{name} {value}");
            }
            assert!(text.contains(&format!("# TYPE {name} ")), "{text}");
        }
        assert!(text.contains("# TYPE process_cpu_seconds_total counter\n"));
    }

    #[test]
    fn without_proc_nothing_is_emitted() {
        let collector = ProcessCollector::with_proc(Path::new("/nonexistent/proc"));
        assert_eq!(collector.read(), ProcessStats::default());
        assert_eq!(collector.clock_ticks, DEFAULT_CLOCK_TICKS);
        let mut registry = Registry::default();
        registry.register_collector(Box::new(collector));
        assert_eq!(crate::encode(&registry).unwrap(), "");
    }

    #[test]
    fn parses_a_fake_proc_tree() {
        let dir = std::env::temp_dir().join(format!("weft-telemetry-{}", std::process::id()));
        let me = dir.join("self");
        std::fs::create_dir_all(me.join("fd")).unwrap();
        for fd in ["0", "1", "2", "7"] {
            std::fs::write(me.join("fd").join(fd), "").unwrap();
        }
        // A command name with spaces and a parenthesis; utime 250, stime 50,
        // starttime 1000, vsize 8 MiB, rss (pages, unused) 99.
        std::fs::write(
            me.join("stat"),
            "42 (weft (x) y) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 4 0 1000 8388608 99 18446744073709551615\n",
        )
        .unwrap();
        std::fs::write(
            me.join("status"),
            "Name:\tweft\nVmSize:\t8192 kB\nVmRSS:\t    2048 kB\n",
        )
        .unwrap();
        std::fs::write(
            me.join("limits"),
            "Limit                     Soft Limit           Hard Limit           Units\nMax open files            1024                 4096                 files\n",
        )
        .unwrap();
        std::fs::write(dir.join("stat"), "cpu  1 2 3\nbtime 1700000000\n").unwrap();
        // An auxiliary vector saying 250 ticks per second.
        let mut auxv = Vec::new();
        for word in [6usize, 4096, AT_CLKTCK, 250, 0, 0] {
            auxv.extend_from_slice(&word.to_ne_bytes());
        }
        std::fs::write(me.join("auxv"), auxv).unwrap();

        let stats = ProcessCollector::with_proc(&dir).read();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            stats,
            ProcessStats {
                cpu_seconds: Some(300.0 / 250.0),
                resident_memory_bytes: Some(2048 * 1024),
                virtual_memory_bytes: Some(8 * 1024 * 1024),
                open_fds: Some(4),
                max_fds: Some(1024),
                start_time_seconds: Some(1_700_000_000.0 + 1000.0 / 250.0),
            }
        );
    }

    #[test]
    fn unlimited_open_files_are_left_out() {
        let limits = "Max open files            unlimited            unlimited            files\n";
        assert_eq!(field_after(limits, "Max open files"), None);
    }
}
