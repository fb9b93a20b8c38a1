//! Sampling the server from the kernel's counters under `/proc`: CPU busy
//! share, memory in use, load average and network bytes. Counters are
//! cumulative, so CPU and network are rates between two samples; the first
//! sample has none (unknown, not zero).

use std::path::{Path, PathBuf};

/// CPU jiffies from the first line of `/proc/stat`: (busy, total).
pub fn parse_cpu(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    if fields.len() < 4 {
        return None;
    }
    // user nice system idle iowait irq softirq steal (guest is inside user).
    let idle = fields[3] + fields.get(4).copied().unwrap_or(0);
    let total: u64 = fields.iter().take(8).sum();
    Some((total.saturating_sub(idle), total))
}

/// Memory in use, 0..1, from `/proc/meminfo` (MemAvailable over MemTotal).
pub fn parse_memory(meminfo: &str) -> Option<f64> {
    let field = |name: &str| {
        meminfo
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
    };
    let total = field("MemTotal:")?;
    let available = field("MemAvailable:")?;
    (total > 0.0).then(|| ((total - available) / total).clamp(0.0, 1.0))
}

/// The one-minute load average from `/proc/loadavg`.
pub fn parse_load1(loadavg: &str) -> Option<f64> {
    loadavg.split_whitespace().next()?.parse().ok()
}

/// Received and sent bytes summed over `interfaces` (all but loopback when
/// empty) from `/proc/net/dev`.
pub fn parse_net(netdev: &str, interfaces: &[String]) -> Option<(u64, u64)> {
    let mut seen = false;
    let (mut rx, mut tx) = (0u64, 0u64);
    for line in netdev.lines().skip(2) {
        let Some((name, counters)) = line.split_once(':') else {
            continue;
        };
        let name = name.trim();
        let counted = if interfaces.is_empty() {
            name != "lo"
        } else {
            interfaces.iter().any(|i| i == name)
        };
        if !counted {
            continue;
        }
        let fields: Vec<u64> = counters
            .split_whitespace()
            .filter_map(|f| f.parse().ok())
            .collect();
        if let (Some(r), Some(t)) = (fields.first(), fields.get(8)) {
            rx = rx.saturating_add(*r);
            tx = tx.saturating_add(*t);
            seen = true;
        }
    }
    seen.then_some((rx, tx))
}

/// One round of measures; `None` is unknown.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sample {
    pub cpu: Option<f64>,
    pub memory: Option<f64>,
    pub load1: Option<f64>,
    pub net_rx_bytes_per_s: Option<f64>,
    pub net_tx_bytes_per_s: Option<f64>,
}

/// Keeps the previous counters to turn them into rates.
#[derive(Debug)]
pub struct Sampler {
    root: PathBuf,
    interfaces: Vec<String>,
    cpu: Option<(u64, u64)>,
    net: Option<(u64, u64, u64)>,
}

impl Sampler {
    pub fn new(root: &Path, interfaces: Vec<String>) -> Self {
        Self {
            root: root.to_owned(),
            interfaces,
            cpu: None,
            net: None,
        }
    }

    fn read(&self, name: &str) -> Option<String> {
        std::fs::read_to_string(self.root.join(name)).ok()
    }

    /// Samples now; `now_ms` times the rates.
    pub fn sample(&mut self, now_ms: u64) -> Sample {
        let mut sample = Sample {
            memory: self.read("meminfo").as_deref().and_then(parse_memory),
            load1: self.read("loadavg").as_deref().and_then(parse_load1),
            ..Sample::default()
        };
        if let Some((busy, total)) = self.read("stat").as_deref().and_then(parse_cpu) {
            if let Some((busy0, total0)) = self.cpu {
                let dt = total.saturating_sub(total0);
                if dt > 0 {
                    let share = busy.saturating_sub(busy0) as f64 / dt as f64;
                    sample.cpu = Some(share.clamp(0.0, 1.0));
                }
            }
            self.cpu = Some((busy, total));
        }
        let net = self
            .read("net/dev")
            .as_deref()
            .and_then(|t| parse_net(t, &self.interfaces));
        if let Some((rx, tx)) = net {
            if let Some((rx0, tx0, at0)) = self.net {
                let dt = now_ms.saturating_sub(at0) as f64 / 1000.0;
                if dt > 0.0 {
                    sample.net_rx_bytes_per_s = Some(rx.saturating_sub(rx0) as f64 / dt);
                    sample.net_tx_bytes_per_s = Some(tx.saturating_sub(tx0) as f64 / dt);
                }
            }
            self.net = Some((rx, tx, now_ms));
        }
        sample
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_kernel_formats() {
        let stat = "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3 4\n";
        assert_eq!(parse_cpu(stat), Some((150, 1000)));
        let meminfo = "MemTotal:       1000 kB\nMemFree:  100 kB\nMemAvailable:    250 kB\n";
        assert_eq!(parse_memory(meminfo), Some(0.75));
        assert_eq!(parse_load1("0.52 0.40 0.33 1/100 42\n"), Some(0.52));
        let netdev = "Inter-|   Receive |  Transmit\n face |bytes packets|bytes\n    lo: 500 5 0 0 0 0 0 0 500 5 0 0 0 0 0 0\n  eth0: 1000 10 0 0 0 0 0 0 2000 20 0 0 0 0 0 0\n";
        assert_eq!(parse_net(netdev, &[]), Some((1000, 2000)));
        assert_eq!(parse_net(netdev, &["lo".to_owned()]), Some((500, 500)));
        assert_eq!(parse_cpu("garbage"), None);
        assert_eq!(parse_memory("MemTotal: x kB"), None);
    }

    #[test]
    fn rates_come_from_two_samples_of_this_machine() {
        let mut sampler = Sampler::new(Path::new("/proc"), Vec::new());
        let first = sampler.sample(1_000);
        assert_eq!(first.cpu, None, "no rate from one sample");
        assert!(first.memory.is_some_and(|m| (0.0..=1.0).contains(&m)));
        // Burn a little CPU so the kernel's counters move.
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        std::hint::black_box(x);
        std::thread::sleep(std::time::Duration::from_millis(50));
        let second = sampler.sample(1_050);
        assert!(
            second.cpu.is_some_and(|c| (0.0..=1.0).contains(&c)),
            "{second:?}"
        );
    }
}
