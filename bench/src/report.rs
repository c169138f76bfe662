//! The table: each figure's repeats as min / median / max, and its ratio to a reference.

/// One figure, measured `repeat` times.
#[derive(Debug, Clone)]
pub struct Figure {
    pub label: String,
    pub values: Vec<f64>,
}

impl Figure {
    pub fn new(label: impl Into<String>, values: Vec<f64>) -> Self {
        Self {
            label: label.into(),
            values,
        }
    }

    /// (min, median, max).
    pub fn spread(&self) -> (f64, f64, f64) {
        let mut v = self.values.clone();
        v.sort_by(f64::total_cmp);
        match v.len() {
            0 => (f64::NAN, f64::NAN, f64::NAN),
            n => (v[0], v[n / 2], v[n - 1]),
        }
    }

    pub fn median(&self) -> f64 {
        self.spread().1
    }
}

/// A section of the table: figures in one unit, each with ratios against references.
pub struct Section {
    pub title: String,
    pub unit: &'static str,
    pub rows: Vec<(Figure, Vec<String>)>,
    pub ratio_names: Vec<String>,
}

impl Section {
    pub fn new(title: impl Into<String>, unit: &'static str, ratio_names: &[&str]) -> Self {
        Self {
            title: title.into(),
            unit,
            rows: Vec::new(),
            ratio_names: ratio_names.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    /// Adds a row; `ratios` are already formatted ("12.3x", "61 %", "").
    pub fn row(&mut self, figure: Figure, ratios: Vec<String>) {
        self.rows.push((figure, ratios));
    }

    pub fn print(&self) {
        println!();
        println!("{} ({})", self.title, self.unit);
        let width = self
            .rows
            .iter()
            .map(|(f, _)| f.label.len())
            .max()
            .unwrap_or(10)
            .max(10);
        let mut header = format!(
            "  {:<width$} {:>10} {:>10} {:>10}",
            "", "min", "median", "max"
        );
        for name in &self.ratio_names {
            header.push_str(&format!(" {name:>16}"));
        }
        println!("{header}");
        for (figure, ratios) in &self.rows {
            let (min, median, max) = figure.spread();
            let mut line = format!(
                "  {:<width$} {:>10} {:>10} {:>10}",
                figure.label,
                number(min),
                number(median),
                number(max)
            );
            for ratio in ratios {
                line.push_str(&format!(" {ratio:>16}"));
            }
            println!("{line}");
        }
    }
}

/// A figure with sensible precision for its size.
pub fn number(value: f64) -> String {
    if !value.is_finite() {
        "-".into()
    } else if value >= 1000.0 {
        format!("{value:.0}")
    } else if value >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

/// `value / reference` as "12.3x".
pub fn times(value: f64, reference: Option<f64>) -> String {
    match reference {
        Some(r) if r > 0.0 && value.is_finite() => format!("{:.1}x", value / r),
        _ => String::new(),
    }
}

/// `value / reference` as "61 %".
pub fn percent(value: f64, reference: Option<f64>) -> String {
    match reference {
        Some(r) if r > 0.0 && value.is_finite() => format!("{:.0} %", 100.0 * value / r),
        _ => String::new(),
    }
}
