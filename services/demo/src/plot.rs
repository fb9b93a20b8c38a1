//! The demo's timeline as a self-contained SVG (offered and served load,
//! utilisation, cluster size and pool, each decision marked, and the p99
//! latency against the objective), and the same series as CSV for whoever
//! wants to plot them another way.
//!
//! Each series is a `<polyline>` whose `id` names it and whose
//! `data-values` attribute holds the plotted values, so the file can be
//! read back by a program as well as by eye.

use std::fmt::Write as _;

/// What the cluster looked like at one moment of the run.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Seconds since the load started.
    pub t_s: f64,
    /// Requests per second the profile asked for.
    pub offered_rps: f64,
    /// Requests per second the front-end answered.
    pub served_rps: f64,
    /// Active members.
    pub members: u32,
    /// Members joining or draining.
    pub changing: u32,
    /// Mean utilisation of the active members, when known.
    pub utilisation: Option<f64>,
    /// Servers free in the pool.
    pub pool_free: u32,
    /// p99 latency of the requests sent since the previous sample, in
    /// milliseconds, when any was answered.
    pub p99_ms: Option<f64>,
}

/// One decision or change, marked on the timeline.
#[derive(Debug, Clone, PartialEq)]
pub struct Mark {
    pub t_s: f64,
    /// `allocate`, `release`, `replace` or `reweight`.
    pub action: String,
    /// What to print by the mark, e.g. `+2` or `-1`.
    pub label: String,
    /// The whole decision, shown on hover.
    pub detail: String,
}

const WIDTH: f64 = 1000.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 30.0;
/// (top, height) of the three panels.
const LOAD: (f64, f64) = (50.0, 150.0);
const UTIL: (f64, f64) = (240.0, 120.0);
const SIZE: (f64, f64) = (400.0, 150.0);
const LATENCY: (f64, f64) = (600.0, 120.0);
const HEIGHT: f64 = 760.0;

struct Axis {
    t_max: f64,
}

impl Axis {
    fn x(&self, t: f64) -> f64 {
        LEFT + (WIDTH - LEFT - RIGHT) * (t / self.t_max).clamp(0.0, 1.0)
    }
}

fn y(panel: (f64, f64), value: f64, max: f64) -> f64 {
    let (top, height) = panel;
    top + height - height * (value / max).clamp(0.0, 1.0)
}

/// A round upper bound for an axis: 1, 2 or 5 times a power of ten.
fn nice_max(value: f64) -> f64 {
    if value <= 0.0 || !value.is_finite() {
        return 1.0;
    }
    let power = 10f64.powf(value.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * power)
        .find(|m| *m >= value)
        .unwrap_or(10.0 * power)
}

fn values(samples: &[Sample], value: impl Fn(&Sample) -> Option<f64>) -> String {
    samples
        .iter()
        .map(|s| value(s).map_or(String::new(), |v| format!("{v:.3}")))
        .collect::<Vec<_>>()
        .join(",")
}

/// The levels drawn across the panels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Levels {
    pub upper: f64,
    pub lower: f64,
    /// The p99 latency objective, in milliseconds.
    pub slo_ms: f64,
}

/// The timeline as an SVG document.
pub fn svg(samples: &[Sample], marks: &[Mark], title: &str, levels: Levels) -> String {
    let t_max = samples
        .iter()
        .map(|s| s.t_s)
        .chain(marks.iter().map(|m| m.t_s))
        .fold(1.0, f64::max);
    let mut canvas = Canvas {
        out: String::new(),
        samples,
        axis: Axis { t_max },
    };
    canvas.open(title);
    canvas.load_panel();
    canvas.utilisation_panel(levels);
    canvas.size_panel();
    canvas.latency_panel(levels.slo_ms);
    canvas.marks(marks);
    canvas.time_axis();
    let _ = writeln!(canvas.out, "</svg>");
    canvas.out
}

/// The document being drawn, and what every panel draws from.
struct Canvas<'a> {
    out: String,
    samples: &'a [Sample],
    axis: Axis,
}

/// Where a panel is, and the top of its scale.
#[derive(Clone, Copy)]
struct Panel {
    place: (f64, f64),
    max: f64,
}

/// How a series is drawn: its `id`, its colour, and whether as a
/// staircase (for counts).
struct Line<'a> {
    id: &'a str,
    colour: &'a str,
    step: bool,
}

impl Canvas<'_> {
    fn open(&mut self, title: &str) {
        let out = &mut self.out;
        let _ = writeln!(
            out,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif">"#
        );
        let _ = writeln!(out, "<title>{}</title>", escape(title));
        let _ = writeln!(
            out,
            r#"<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/><text x="{LEFT}" y="22" font-size="16" font-weight="bold">{}</text>"#,
            escape(title)
        );
    }

    fn load_panel(&mut self) {
        let most = self.samples.iter().map(|s| s.offered_rps.max(s.served_rps));
        let panel = Panel {
            place: LOAD,
            max: nice_max(most.fold(0.0, f64::max)),
        };
        self.frame(panel, "Load (requests/s)");
        self.legend(LOAD, &[("offered", "#888"), ("served", "#1f77b4")]);
        let offered = line("offered-load", "#888", false);
        self.series(panel, &offered, |s| Some(s.offered_rps));
        let served = line("served-load", "#1f77b4", false);
        self.series(panel, &served, |s| Some(s.served_rps));
    }

    fn utilisation_panel(&mut self, levels: Levels) {
        let known = self.samples.iter().filter_map(|s| s.utilisation);
        let panel = Panel {
            place: UTIL,
            max: known.fold(1.0f64, f64::max).min(3.0),
        };
        self.frame(panel, "Utilisation (mean of active members)");
        for (level, name) in [(levels.upper, "upper"), (levels.lower, "lower")] {
            let ly = y(UTIL, level, panel.max);
            let _ = writeln!(
                self.out,
                r##"<line x1="{LEFT}" x2="{:.0}" y1="{ly:.1}" y2="{ly:.1}" stroke="#d62728" stroke-dasharray="4 3" stroke-width="1"/><text x="{:.0}" y="{:.1}" font-size="10" fill="#d62728" text-anchor="end">{name} {level}</text>"##,
                WIDTH - RIGHT,
                WIDTH - RIGHT - 4.0,
                ly - 3.0
            );
        }
        let utilisation = line("utilisation", "#ff7f0e", false);
        self.series(panel, &utilisation, |s| s.utilisation);
    }

    fn size_panel(&mut self) {
        // Whole servers: an even top, so the middle label is whole too.
        let most = self
            .samples
            .iter()
            .map(|s| (s.members + s.changing).max(s.pool_free))
            .max()
            .unwrap_or(1);
        let panel = Panel {
            place: SIZE,
            max: f64::from((most + 2) / 2 * 2),
        };
        self.frame(panel, "Cluster size and free pool (servers)");
        let entries = [
            ("members", "#2ca02c"),
            ("joining/draining", "#9467bd"),
            ("pool free", "#8c564b"),
        ];
        self.legend(SIZE, &entries);
        let members = line("cluster-size", "#2ca02c", true);
        self.series(panel, &members, |s| Some(f64::from(s.members)));
        let changing = line("changing", "#9467bd", true);
        self.series(panel, &changing, |s| Some(f64::from(s.changing)));
        let free = line("pool-free", "#8c564b", true);
        self.series(panel, &free, |s| Some(f64::from(s.pool_free)));
    }

    /// p99 latency on a log scale from 10 ms, so that both a healthy
    /// 150 ms and an overloaded 5 s show, with the objective across it.
    fn latency_panel(&mut self, slo_ms: f64) {
        let worst = self
            .samples
            .iter()
            .filter_map(|s| s.p99_ms)
            .fold(slo_ms * 2.0, f64::max);
        let decades = (worst / 10.0).log10().ceil().max(1.0);
        let log = |ms: f64| (ms.max(10.0) / 10.0).log10();
        let title = format!(
            "p99 latency (ms, log scale from 10 to {:.0})",
            10.0 * 10f64.powf(decades)
        );
        let panel = Panel {
            place: LATENCY,
            max: decades,
        };
        self.frame(panel, &title);
        let ly = y(LATENCY, log(slo_ms), decades);
        let _ = writeln!(
            self.out,
            r##"<line id="slo" data-value="{slo_ms}" x1="{LEFT}" x2="{:.0}" y1="{ly:.1}" y2="{ly:.1}" stroke="#d62728" stroke-dasharray="4 3" stroke-width="1"/><text x="{:.0}" y="{:.1}" font-size="10" fill="#d62728" text-anchor="end">SLO {slo_ms} ms</text>"##,
            WIDTH - RIGHT,
            WIDTH - RIGHT - 4.0,
            ly - 3.0
        );
        let points: Vec<String> = self
            .samples
            .iter()
            .filter_map(|s| {
                let p = s.p99_ms?;
                let (x, y) = (self.axis.x(s.t_s), y(LATENCY, log(p), decades));
                Some(format!("{x:.1},{y:.1}"))
            })
            .collect();
        let _ = writeln!(
            self.out,
            r##"<polyline id="p99-latency" data-values="{}" fill="none" stroke="#e377c2" stroke-width="2" points="{}"/>"##,
            values(self.samples, |s| s.p99_ms),
            points.join(" ")
        );
    }

    /// Each decision, a dashed line across the panels with its label.
    fn marks(&mut self, marks: &[Mark]) {
        for (i, mark) in marks.iter().enumerate() {
            let x = self.axis.x(mark.t_s);
            // Staggered on three rows, so marks close in time stay readable.
            let label_y = SIZE.0 + 12.0 + 12.0 * (i % 3) as f64;
            let colour = match mark.action.as_str() {
                "allocate" => "#2ca02c",
                "release" => "#d62728",
                _ => "#9467bd",
            };
            let _ = writeln!(
                self.out,
                r#"<g class="decision" data-t="{:.2}" data-action="{}"><title>{}</title><line x1="{x:.1}" x2="{x:.1}" y1="{}" y2="{}" stroke="{colour}" stroke-dasharray="2 3" stroke-width="1"/><text x="{:.1}" y="{label_y}" font-size="10" fill="{colour}">{}</text></g>"#,
                mark.t_s,
                escape(&mark.action),
                escape(&mark.detail),
                LOAD.0,
                SIZE.0 + SIZE.1,
                x + 2.0,
                escape(&mark.label)
            );
        }
    }

    fn time_axis(&mut self) {
        let bottom = LATENCY.0 + LATENCY.1;
        let t_max = self.axis.t_max;
        let tick = nice_max(t_max / 8.0);
        let mut t = 0.0;
        while t <= t_max + 1e-9 {
            let _ = writeln!(
                self.out,
                r##"<text x="{:.1}" y="{:.0}" font-size="11" text-anchor="middle" fill="#555">{t:.0}s</text>"##,
                self.axis.x(t),
                bottom + 16.0
            );
            t += tick;
        }
    }

    /// A polyline through the known values (a gap where one is unknown
    /// starts a new segment); a staircase when `line.step`.
    fn series(
        &mut self,
        panel: Panel,
        line: &Line<'_>,
        value: impl Fn(&Sample) -> Option<f64> + Copy,
    ) {
        let Panel { place, max } = panel;
        let mut points = Vec::new();
        let mut previous: Option<f64> = None;
        for s in self.samples {
            let x = self.axis.x(s.t_s);
            match value(s) {
                Some(v) => {
                    if let (true, Some(p)) = (line.step, previous) {
                        points.push(format!("{x:.1},{:.1}", y(place, p, max)));
                    }
                    points.push(format!("{x:.1},{:.1}", y(place, v, max)));
                    previous = Some(v);
                }
                None => previous = None,
            }
        }
        let _ = writeln!(
            self.out,
            r#"<polyline id="{}" data-values="{}" fill="none" stroke="{}" stroke-width="2" points="{}"/>"#,
            line.id,
            values(self.samples, value),
            line.colour,
            points.join(" ")
        );
    }

    fn frame(&mut self, panel: Panel, title: &str) {
        let ((top, height), max) = (panel.place, panel.max);
        let out = &mut self.out;
        let _ = writeln!(
            out,
            r##"<rect x="{LEFT}" y="{top}" width="{}" height="{height}" fill="#fafafa" stroke="#ccc"/>"##,
            WIDTH - LEFT - RIGHT
        );
        let _ = writeln!(
            out,
            r#"<text x="{LEFT}" y="{}" font-size="13" font-weight="bold">{title}</text>"#,
            top - 6.0
        );
        for fraction in [0.0, 0.5, 1.0] {
            let v = max * fraction;
            let label = if v.fract() == 0.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.2}")
            };
            let _ = writeln!(
                out,
                r##"<text x="{}" y="{:.1}" font-size="11" text-anchor="end" fill="#555">{label}</text>"##,
                LEFT - 6.0,
                top + height - height * fraction + 4.0,
            );
        }
    }

    fn legend(&mut self, place: (f64, f64), entries: &[(&str, &str)]) {
        let mut x = WIDTH - RIGHT - 10.0;
        for (name, colour) in entries.iter().rev() {
            x -= 8.0 * name.len() as f64 + 24.0;
            let _ = writeln!(
                self.out,
                r#"<rect x="{x:.0}" y="{:.0}" width="14" height="4" fill="{colour}"/><text x="{:.0}" y="{:.0}" font-size="11">{name}</text>"#,
                place.0 - 12.0,
                x + 18.0,
                place.0 - 7.0
            );
        }
    }
}

fn line<'a>(id: &'a str, colour: &'a str, step: bool) -> Line<'a> {
    Line { id, colour, step }
}

/// Sets each sample's p99 from the requests sent since the sample before
/// it, `steps` being the load's tally of each step of `step_s` seconds.
pub fn fill_p99(samples: &mut [Sample], steps: &[headroom_loadgen::StepTally], step_s: f64) {
    let mut next = 0usize;
    for sample in samples {
        let mut latencies: Vec<u32> = Vec::new();
        while next < steps.len() && (next as f64) * step_s < sample.t_s {
            latencies.extend_from_slice(&steps[next].latencies_us);
            next += 1;
        }
        sample.p99_ms = headroom_loadgen::percentile_ms(&mut latencies, 0.99);
    }
}

/// The same series as CSV, one row per sample.
pub fn csv(samples: &[Sample]) -> String {
    let mut out = String::from(
        "t_s,offered_rps,served_rps,members,joining_or_draining,utilisation,pool_free,p99_ms\n",
    );
    for s in samples {
        let _ = writeln!(
            out,
            "{:.2},{:.1},{:.1},{},{},{},{},{}",
            s.t_s,
            s.offered_rps,
            s.served_rps,
            s.members,
            s.changing,
            s.utilisation.map_or(String::new(), |u| format!("{u:.3}")),
            s.pool_free,
            s.p99_ms.map_or(String::new(), |p| format!("{p:.1}"))
        );
    }
    out
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The values of the series `id` in an SVG written by [`svg`] (`None` for
/// an unknown value).
pub fn read_series(svg: &str, id: &str) -> Option<Vec<Option<f64>>> {
    let start = svg.find(&format!(r#"<polyline id="{id}" data-values=""#))?;
    let rest = &svg[start..];
    let open = rest.find("data-values=\"")? + "data-values=\"".len();
    let close = rest[open..].find('"')? + open;
    Some(
        rest[open..close]
            .split(',')
            .map(|v| v.parse().ok())
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(t_s: f64, members: u32, utilisation: Option<f64>) -> Sample {
        Sample {
            t_s,
            offered_rps: 10.0 * t_s,
            served_rps: 9.0 * t_s,
            members,
            changing: 0,
            utilisation,
            pool_free: 4 - members,
            p99_ms: Some(100.0 * t_s + 50.0),
        }
    }

    #[test]
    fn the_svg_carries_every_series_and_mark() {
        let samples = [
            sample(0.0, 1, Some(0.2)),
            sample(1.0, 1, None),
            sample(2.0, 3, Some(0.9)),
        ];
        let marks = [Mark {
            t_s: 1.5,
            action: "allocate".into(),
            label: "+2".into(),
            detail: "allocate 2".into(),
        }];
        let levels = Levels {
            upper: 0.75,
            lower: 0.3,
            slo_ms: 250.0,
        };
        let svg = svg(&samples, &marks, "demo <run>", levels);
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(
            read_series(&svg, "cluster-size"),
            Some(vec![Some(1.0), Some(1.0), Some(3.0)])
        );
        assert_eq!(
            read_series(&svg, "utilisation"),
            Some(vec![Some(0.2), None, Some(0.9)])
        );
        assert_eq!(
            read_series(&svg, "pool-free"),
            Some(vec![Some(3.0), Some(3.0), Some(1.0)])
        );
        assert_eq!(
            read_series(&svg, "p99-latency"),
            Some(vec![Some(50.0), Some(150.0), Some(250.0)])
        );
        assert!(svg.contains(r#"<line id="slo" data-value="250""#));
        assert!(svg.contains(r#"data-action="allocate""#));
        assert!(svg.contains("demo &lt;run&gt;"));
        let csv = csv(&samples);
        assert_eq!(csv.lines().count(), 4);
        assert!(csv
            .lines()
            .nth(2)
            .is_some_and(|l| l.ends_with(",1,0,,3,150.0")));
    }

    #[test]
    fn axes_round_up() {
        assert_eq!(nice_max(0.0), 1.0);
        assert_eq!(nice_max(3.0), 5.0);
        assert_eq!(nice_max(180.0), 200.0);
        assert_eq!(nice_max(1000.0), 1000.0);
    }
}
