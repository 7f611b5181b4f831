//! Results: per case, rows of one measure across the paths (median and spread over
//! the interleaved rounds, ratio vizor/peer, the target), printed as one
//! Markdown table and written as JSON.

use crate::proxy::Way;
use serde::Serialize;
use std::collections::BTreeMap;

/// The median of `v` (NaN when empty).
pub fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// The `q` quantile (0..=1) of sorted samples, nearest rank.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// One path's value of a measure.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    /// Median over the rounds.
    pub median: f64,
    /// Smallest round.
    pub min: f64,
    /// Largest round.
    pub max: f64,
    /// Every round's value, in order.
    pub rounds: Vec<f64>,
    /// Anything a reader must know about this value (sessions reached, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl Cell {
    /// A cell of the rounds' values.
    pub fn of(rounds: Vec<f64>) -> Cell {
        let finite = rounds.iter().copied().filter(|x| x.is_finite());
        Cell {
            median: median(&rounds),
            min: finite.clone().fold(f64::INFINITY, f64::min),
            max: finite.fold(f64::NEG_INFINITY, f64::max),
            rounds,
            note: None,
        }
    }
}

/// What a row's target asks of vizor.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Goal {
    /// vizor's median / direct's median at least this.
    RatioToDirectAtLeast(f64),
    /// vizor's median at most this.
    AtMost(f64),
    /// vizor's median / the named path's at least this.
    RatioToAtLeast(&'static str, f64),
    /// vizor's median / the named path's at most this.
    RatioToAtMost(&'static str, f64),
}

/// A row's target.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// As the issue states it.
    pub text: String,
    /// How it is checked.
    pub goal: Goal,
}

/// One measure across the paths.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Such as "throughput".
    pub measure: String,
    /// Such as "GiB/s".
    pub unit: String,
    /// Whether larger values are better.
    pub higher_is_better: bool,
    /// By path name; a path without a value has a note instead.
    pub cells: BTreeMap<String, Cell>,
    /// Paths without a value, and why.
    pub missing: BTreeMap<String, String>,
    /// vizor's median / the peer's median.
    pub ratios: BTreeMap<String, f64>,
    /// The target, where it sets one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<Target>,
    /// Whether vizor meets it (`None` without a target or a value).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub met: Option<bool>,
    /// How far off the target vizor is, in the row's unit or as a ratio.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub miss: Option<String>,
}

impl Row {
    /// An empty row.
    pub fn new(measure: &str, unit: &str, higher_is_better: bool) -> Row {
        Row {
            measure: measure.into(),
            unit: unit.into(),
            higher_is_better,
            cells: BTreeMap::new(),
            missing: BTreeMap::new(),
            ratios: BTreeMap::new(),
            target: None,
            met: None,
            miss: None,
        }
    }

    /// With the target.
    pub fn target(mut self, text: &str, goal: Goal) -> Row {
        self.target = Some(Target {
            text: text.into(),
            goal,
        });
        self
    }

    /// Sets `way`'s value.
    pub fn set(&mut self, way: Way, cell: Cell) {
        self.cells.insert(way.name().into(), cell);
    }

    /// Says why `way` has no value.
    pub fn without(&mut self, way: Way, why: impl Into<String>) {
        self.missing.insert(way.name().into(), why.into());
    }

    /// Computes ratios and the verdict once the cells are in.
    pub fn finish(mut self) -> Row {
        if let Some(v) = self.cells.get("vizor").map(|c| c.median) {
            for (way, cell) in &self.cells {
                if way != "vizor" && cell.median.is_finite() && cell.median != 0.0 {
                    self.ratios.insert(way.clone(), v / cell.median);
                }
            }
            if let Some(t) = &self.target {
                match t.goal {
                    Goal::AtMost(max) if v.is_finite() => {
                        self.met = Some(v <= max);
                        if v > max {
                            self.miss = Some(format!(
                                "{} {} over ({:.1}x the target)",
                                num(v - max),
                                self.unit,
                                v / max
                            ));
                        }
                    }
                    Goal::RatioToDirectAtLeast(min) => {
                        if let Some(r) = self.ratios.get("direct").copied() {
                            self.met = Some(r >= min);
                            if r < min {
                                self.miss = Some(format!("{r:.2}x of direct, {min}x wanted"));
                            }
                        }
                    }
                    Goal::AtMost(_) => {}
                    Goal::RatioToAtLeast(peer, min) => {
                        if let Some(r) = self.ratios.get(peer).copied() {
                            self.met = Some(r >= min);
                            if r < min {
                                self.miss = Some(format!("{r:.2}x of {peer}, {min}x wanted"));
                            }
                        }
                    }
                    Goal::RatioToAtMost(peer, max) => {
                        if let Some(r) = self.ratios.get(peer).copied() {
                            self.met = Some(r <= max);
                            if r > max {
                                self.miss = Some(format!("{r:.2}x of {peer}, {max}x at most"));
                            }
                        }
                    }
                }
            }
        }
        self
    }
}

/// One case's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Case {
    /// Short name (`bulk`, `small`, ...).
    pub name: String,
    /// What it measures.
    pub title: String,
    /// Its rows.
    pub rows: Vec<Row>,
    /// Correctness checks passed or failed, by path.
    pub checks: Vec<String>,
    /// What failed (a failed check fails the case).
    pub errors: Vec<String>,
    /// Settings and observations.
    pub notes: Vec<String>,
    /// Wall time of the case.
    pub seconds: f64,
}

impl Case {
    /// An empty case.
    pub fn new(name: &str, title: &str) -> Case {
        Case {
            name: name.into(),
            title: title.into(),
            rows: Vec::new(),
            checks: Vec::new(),
            errors: Vec::new(),
            notes: Vec::new(),
            seconds: 0.0,
        }
    }
}

/// A number with three significant digits or so.
pub fn num(x: f64) -> String {
    if !x.is_finite() {
        return "-".into();
    }
    let a = x.abs();
    if a >= 100.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else if a >= 0.1 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

fn cell_text(row: &Row, way: Way) -> String {
    match (row.cells.get(way.name()), row.missing.get(way.name())) {
        (Some(c), _) => {
            let mut t = if c.rounds.len() > 1 {
                format!("{} ({}-{})", num(c.median), num(c.min), num(c.max))
            } else {
                num(c.median)
            };
            if let Some(n) = &c.note {
                t.push_str(&format!(" [{n}]"));
            }
            t
        }
        (None, Some(why)) => why.clone(),
        (None, None) => "-".into(),
    }
}

/// The table: one line per row of every case.
pub fn table(cases: &[Case], ways: &[Way]) -> String {
    let peers: Vec<Way> = ways.iter().copied().filter(|w| *w != Way::Vizor).collect();
    let mut head = vec!["case".to_owned(), "measure".to_owned()];
    head.extend(ways.iter().map(|w| w.name().to_owned()));
    head.extend(peers.iter().map(|p| format!("vizor/{}", p.name())));
    head.push("target (vizor)".into());
    head.push("met".into());
    let mut lines = vec![head];
    for case in cases {
        for row in &case.rows {
            let mut l = vec![case.name.clone(), format!("{} ({})", row.measure, row.unit)];
            l.extend(ways.iter().map(|&w| cell_text(row, w)));
            l.extend(peers.iter().map(|p| {
                row.ratios
                    .get(p.name())
                    .map_or("-".into(), |r| format!("{r:.2}"))
            }));
            l.push(
                row.target
                    .as_ref()
                    .map_or(String::new(), |t| t.text.clone()),
            );
            l.push(match (row.met, &row.miss) {
                (Some(true), _) => "yes".into(),
                (Some(false), Some(m)) => format!("NO: {m}"),
                (Some(false), None) => "NO".into(),
                (None, _) if row.target.is_some() => "?".into(),
                (None, _) => String::new(),
            });
            lines.push(l);
        }
    }
    let cols = lines[0].len();
    let widths: Vec<usize> = (0..cols)
        .map(|i| {
            lines
                .iter()
                .map(|l| l[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for (n, l) in lines.iter().enumerate() {
        out.push('|');
        for (i, c) in l.iter().enumerate() {
            out.push_str(&format!(" {c:<w$} |", w = widths[i]));
        }
        out.push('\n');
        if n == 0 {
            out.push('|');
            for w in &widths {
                out.push_str(&format!("{}|", "-".repeat(w + 2)));
            }
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_quantiles() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        let s: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&s, 0.5), 50.0);
        assert_eq!(quantile(&s, 0.99), 99.0);
        assert_eq!(quantile(&s, 1.0), 100.0);
    }

    #[test]
    fn ratio_targets() {
        let mut r = Row::new("throughput", "GiB/s", true)
            .target(">= 0.75x direct", Goal::RatioToDirectAtLeast(0.75));
        r.set(Way::Direct, Cell::of(vec![4.0, 4.0]));
        r.set(Way::Vizor, Cell::of(vec![2.0, 2.0]));
        let r = r.finish();
        assert_eq!(r.ratios["direct"], 0.5);
        assert_eq!(r.met, Some(false));
    }
}
