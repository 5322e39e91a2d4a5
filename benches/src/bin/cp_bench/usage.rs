//! What the bench reads about the processes under test: a process's CPU time
//! and RSS from `/proc`, and samples from etcd's Prometheus `/metrics`.

use anyhow::Context as _;

/// (utime + stime in seconds, RSS in bytes) of `pid`.
pub fn process_usage(pid: u32) -> anyhow::Result<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').context("stat format")?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After the command: state is field 3; utime and stime are fields 14, 15.
    let ticks: f64 = fields.get(11).context("utime")?.parse::<f64>()?
        + fields.get(12).context("stime")?.parse::<f64>()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("VmRSS")?;
    // USER_HZ is 100 on Linux for every architecture /proc reports in.
    Ok((ticks / 100.0, rss_kb * 1024))
}

/// The kernel's count of connections dropped because a listen queue was
/// full (`TcpExt: ListenOverflows` in `/proc/net/netstat`, for the whole
/// network namespace): a dropped SYN is sent again after 1 s, 2 s, 4 s...
pub fn listen_overflows() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/netstat").ok()?;
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next()?, lines.next()?);
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "ListenOverflows")
        .and_then(|(_, v)| v.parse().ok())
}

/// etcd's `/metrics` page (Prometheus text).
pub async fn etcd_metrics(etcd: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = etcd.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    // HTTP/1.0: the body comes unchunked and the server closes after it.
    s.write_all(format!("GET /metrics HTTP/1.0\r\nhost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

/// The sum of the samples of metric `name` whose labels include every pair
/// in `labels` (`grpc_method="LeaseKeepAlive"`).
pub fn sample_sum(metrics: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metrics
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let (label_text, value) = match rest.strip_prefix('{') {
                Some(r) => r.split_once("} ")?,
                None => ("", rest.strip_prefix(' ')?),
            };
            labels
                .iter()
                .all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\"")))
                .then(|| value.trim().parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// `etcd_debugging_mvcc_watcher_total` from etcd's /metrics.
pub async fn etcd_watchers(etcd: &str) -> anyhow::Result<f64> {
    let metrics = etcd_metrics(etcd).await?;
    anyhow::ensure!(
        metrics.contains("etcd_debugging_mvcc_watcher_total "),
        "no etcd_debugging_mvcc_watcher_total in etcd's /metrics"
    );
    Ok(sample_sum(
        &metrics,
        "etcd_debugging_mvcc_watcher_total",
        &[],
    ))
}

/// Each CPU's (busy, total) time in clock ticks since boot, from
/// `/proc/stat` (`cpu0`, `cpu1`, ...; idle and iowait count as not busy).
pub fn cpu_ticks() -> Vec<(u64, u64)> {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return Vec::new();
    };
    stat.lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .map(|l| {
            let v: Vec<u64> = l
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            let total: u64 = v.iter().take(8).sum();
            let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
            (total - idle, total)
        })
        .collect()
}

/// Each CPU's busy share (0-100) between two [`cpu_ticks`] readings.
pub fn cpu_busy(before: &[(u64, u64)], after: &[(u64, u64)]) -> Vec<f64> {
    before
        .iter()
        .zip(after)
        .map(|(&(b0, t0), &(b1, t1))| {
            let total = t1.saturating_sub(t0);
            if total == 0 {
                0.0
            } else {
                100.0 * b1.saturating_sub(b0) as f64 / total as f64
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::sample_sum;

    #[test]
    fn samples_are_summed_by_label() {
        let text = "# HELP x\n\
            grpc_server_started_total{grpc_method=\"LeaseKeepAlive\",grpc_service=\"etcdserverpb.Lease\"} 7\n\
            grpc_server_started_total{grpc_method=\"Range\",grpc_service=\"etcdserverpb.KV\"} 3\n\
            grpc_server_started_total_other 100\n\
            plain 2.5\n";
        assert_eq!(sample_sum(text, "grpc_server_started_total", &[]), 10.0);
        assert_eq!(
            sample_sum(
                text,
                "grpc_server_started_total",
                &[("grpc_method", "LeaseKeepAlive")]
            ),
            7.0
        );
        assert_eq!(sample_sum(text, "plain", &[]), 2.5);
    }
}
