//! Shared by the benchmark programs: a result table that puts each figure beside its baseline.

use std::fmt::Write as _;

/// One measured figure, with the baseline it is compared against (if any) and the aim.
pub struct Row {
    pub name: String,
    pub value: f64,
    pub baseline: Option<f64>,
    pub unit: &'static str,
    pub aim: String,
}

#[derive(Default)]
pub struct Table {
    rows: Vec<Row>,
}

impl Table {
    pub fn add(
        &mut self,
        name: impl Into<String>,
        value: f64,
        baseline: Option<f64>,
        unit: &'static str,
        aim: impl Into<String>,
    ) {
        self.rows.push(Row {
            name: name.into(),
            value,
            baseline,
            unit,
            aim: aim.into(),
        });
    }

    pub fn render(&self, title: &str) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "\n{title}");
        let _ = writeln!(
            out,
            "{:<40} {:>14} {:>14} {:>8}  {:<10} aim",
            "figure", "value", "baseline", "ratio", "unit"
        );
        for row in &self.rows {
            let baseline = row.baseline.map_or("-".to_owned(), format_number);
            let ratio = row
                .baseline
                .filter(|b| *b != 0.0)
                .map_or("-".to_owned(), |b| format!("{:.2}", row.value / b));
            let _ = writeln!(
                out,
                "{:<40} {:>14} {:>14} {:>8}  {:<10} {}",
                row.name,
                format_number(row.value),
                baseline,
                ratio,
                row.unit,
                row.aim
            );
        }
        out
    }
}

fn format_number(value: f64) -> String {
    if value.abs() >= 1000.0 {
        let mut digits = format!("{:.0}", value);
        let mut i = digits.len() as isize - 3;
        let start = if value < 0.0 { 1 } else { 0 };
        while i > start {
            digits.insert(i as usize, ',');
            i -= 3;
        }
        digits
    } else {
        format!("{value:.3}")
    }
}
