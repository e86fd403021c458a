//! Rows of figures and the table they print as.

use std::fmt;

use hdrhistogram::Histogram;

/// Latency percentiles of one workload, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Latency {
    /// Samples recorded.
    pub count: u64,
    /// Median.
    pub p50_us: u64,
    /// 99th percentile: what the targets are stated in.
    pub p99_us: u64,
    /// Worst sample.
    pub max_us: u64,
}

impl Latency {
    /// Percentiles of a histogram in µs, or `None` when it is empty.
    pub(crate) fn of(hist: &Histogram<u64>) -> Option<Self> {
        (!hist.is_empty()).then(|| Self {
            count: hist.len(),
            p50_us: hist.value_at_quantile(0.50),
            p99_us: hist.value_at_quantile(0.99),
            max_us: hist.max(),
        })
    }
}

/// The figures of one workload (or one size of it).
#[derive(Debug, Clone, Default)]
pub struct Row {
    /// Workload name and size, e.g. `watch 1000`.
    pub name: String,
    /// Measured successful operations (calls, stream messages, deliveries).
    pub ops: u64,
    /// Throughput in `unit`s per second, for closed-loop workloads.
    pub rate: Option<f64>,
    /// What `rate` counts: calls, renewals, registrations.
    pub unit: &'static str,
    /// Per-operation latency (or lateness, for expiry).
    pub latency: Option<Latency>,
    /// Measured operations that failed, or deliveries that never came.
    pub errors: u64,
    /// Secondary figures: bytes/instance, registry CPU, first error...
    pub notes: Vec<String>,
    /// `rate` as a percentage of the ceiling's calls/s in the same run.
    pub pct_of_ceiling: Option<f64>,
    /// p99 as a multiple of the ceiling's p99 in the same run.
    pub p99_vs_ceiling: Option<f64>,
}

/// All rows of a run, the ceiling first.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// One per workload run, in order.
    pub rows: Vec<Row>,
    ceiling_rate: Option<f64>,
    ceiling_p99_us: Option<u64>,
}

impl Report {
    /// Remembers the ceiling the following rows are compared to.
    pub(crate) fn set_ceiling(&mut self, ceiling: &Row) {
        self.ceiling_rate = ceiling.rate;
        self.ceiling_p99_us = ceiling.latency.map(|l| l.p99_us);
    }

    /// Adds a row, filling in its comparison to the ceiling.
    pub(crate) fn push(&mut self, mut row: Row) {
        // Only calls compare with calls: renewals batch many per call, so
        // their row carries its calls/s in a note.
        let calls = match row.rate {
            Some(rate) if row.unit == "calls" || row.unit == "registrations" => Some(rate),
            _ => rate_of_calls(&row),
        };
        if let (Some(calls), Some(ceiling)) = (calls, self.ceiling_rate) {
            row.pct_of_ceiling = Some(100.0 * calls / ceiling);
        }
        if let (Some(lat), Some(ceiling)) = (row.latency, self.ceiling_p99_us) {
            row.p99_vs_ceiling = Some(lat.p99_us as f64 / ceiling.max(1) as f64);
        }
        tracing::info!("{}", RowLine(&row));
        self.rows.push(row);
    }

    /// Adds several rows.
    pub(crate) fn extend(&mut self, rows: Vec<Row>) {
        for row in rows {
            self.push(row);
        }
    }

    /// The row with this name, if it ran.
    pub fn row(&self, name: &str) -> Option<&Row> {
        self.rows.iter().find(|r| r.name == name)
    }
}

/// Calls per second of a row whose rate counts something else (the note
/// `calls/s N` carries it).
fn rate_of_calls(row: &Row) -> Option<f64> {
    row.notes
        .iter()
        .find_map(|n| n.strip_prefix("calls/s ").and_then(|v| v.parse().ok()))
}

fn ms(us: u64) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

struct RowLine<'a>(&'a Row);

impl fmt::Display for RowLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = self.0;
        write!(f, "{}: ", r.name)?;
        if let Some(rate) = r.rate {
            write!(f, "{rate:.0} {}/s", r.unit)?;
        }
        if let Some(l) = r.latency {
            write!(
                f,
                " p50 {} ms p99 {} ms max {} ms",
                ms(l.p50_us),
                ms(l.p99_us),
                ms(l.max_us)
            )?;
        }
        write!(f, " errors {}", r.errors)?;
        for n in &r.notes {
            write!(f, "; {n}")?;
        }
        Ok(())
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "| workload | ops | rate | % ceiling | p50 ms | p99 ms | max ms | p99 / ceiling p99 | errors | notes |"
        )?;
        writeln!(f, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")?;
        for r in &self.rows {
            let rate = r
                .rate
                .map(|v| format!("{v:.0} {}/s", r.unit))
                .unwrap_or_else(|| "-".into());
            let pct = r
                .pct_of_ceiling
                .map(|v| format!("{v:.1}%"))
                .unwrap_or_else(|| "-".into());
            let (p50, p99, max) = r
                .latency
                .map(|l| (ms(l.p50_us), ms(l.p99_us), ms(l.max_us)))
                .unwrap_or_else(|| ("-".into(), "-".into(), "-".into()));
            let vs = r
                .p99_vs_ceiling
                .map(|v| format!("{v:.1}x"))
                .unwrap_or_else(|| "-".into());
            writeln!(
                f,
                "| {} | {} | {rate} | {pct} | {p50} | {p99} | {max} | {vs} | {} | {} |",
                r.name,
                r.ops,
                r.errors,
                r.notes.join("; ")
            )?;
        }
        Ok(())
    }
}
