//! The metric catalog (`schemas/catalog/metrics.json`): for each metric its kind, canonical unit, the
//! units accepted at the edge with their exact conversion, and the plausible range of one sample.
//! Normalisation is a pure function of the catalog: [`Catalog::normalise`].

use std::collections::BTreeMap;
use std::sync::OnceLock;

use serde::Deserialize;

/// The catalog file, embedded.
pub const CATALOG_JSON: &str = include_str!("../catalog/metrics.json");

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MetricKind {
    /// Summed per day; overlapping sources are never summed (priority wins per sub-interval).
    Cumulative,
    /// Count/min/max/mean; all sources kept.
    Discrete,
    /// Minutes per category (sleep stages, mindful).
    Category,
    /// Last value of the day, min, max.
    Instant,
}

impl MetricKind {
    pub fn to_record(self) -> crate::MetricKindRecord {
        match self {
            MetricKind::Cumulative => crate::MetricKindRecord::Cumulative,
            MetricKind::Discrete => crate::MetricKindRecord::Discrete,
            MetricKind::Category => crate::MetricKindRecord::Category,
            MetricKind::Instant => crate::MetricKindRecord::Instant,
        }
    }
}

/// One metric of the catalog.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricSpec {
    pub kind: MetricKind,
    /// The canonical unit every sample is stored in.
    pub unit: String,
    /// Plausible range of one sample's value, inclusive, in the canonical unit.
    pub range: [f64; 2],
    /// Accepted unit → (factor, offset): canonical = value × factor + offset.
    #[serde(default)]
    pub units: BTreeMap<String, [f64; 2]>,
    /// For category metrics: the accepted categories.
    #[serde(default)]
    pub categories: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Catalog {
    #[serde(rename = "_doc")]
    _doc: String,
    pub metrics: BTreeMap<String, MetricSpec>,
}

/// Why a value could not be normalised. Each maps to a stable error code at the edge.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NormaliseError {
    #[error("unknown metric `{0}`")]
    UnknownMetric(String),
    #[error("unit `{unit}` is not accepted for metric `{metric}` (accepted: {accepted})")]
    UnconvertibleUnit { metric: String, unit: String, accepted: String },
    #[error("value is not a finite number")]
    NotFinite,
    #[error("value {value} {unit} is outside the plausible range [{min}, {max}] {unit}")]
    OutOfRange { value: f64, unit: String, min: f64, max: f64 },
    #[error("category `{category}` is not one of {accepted} for metric `{metric}`")]
    UnknownCategory { metric: String, category: String, accepted: String },
    #[error("metric `{0}` is a category metric and needs a category")]
    MissingCategory(String),
    #[error("metric `{0}` needs a value and a unit")]
    MissingValue(String),
}

impl NormaliseError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            NormaliseError::UnknownMetric(_) => "unknown_metric",
            NormaliseError::UnconvertibleUnit { .. } => "unconvertible_unit",
            NormaliseError::NotFinite => "value_not_finite",
            NormaliseError::OutOfRange { .. } => "value_out_of_range",
            NormaliseError::UnknownCategory { .. } => "unknown_category",
            NormaliseError::MissingCategory(_) => "missing_category",
            NormaliseError::MissingValue(_) => "missing_value",
        }
    }

    /// The request field at fault.
    pub fn field(&self) -> &'static str {
        match self {
            NormaliseError::UnknownMetric(_) => "metric",
            NormaliseError::UnconvertibleUnit { .. } => "unit",
            NormaliseError::NotFinite | NormaliseError::OutOfRange { .. } | NormaliseError::MissingValue(_) => "value",
            NormaliseError::UnknownCategory { .. } | NormaliseError::MissingCategory(_) => "category",
        }
    }
}

/// A value in its metric's canonical unit.
#[derive(Debug, Clone, PartialEq)]
pub struct Normalised {
    pub value: f64,
    pub unit: String,
    pub category: Option<String>,
}

impl Catalog {
    /// The embedded catalog, parsed once.
    pub fn embedded() -> &'static Catalog {
        static CATALOG: OnceLock<Catalog> = OnceLock::new();
        CATALOG.get_or_init(|| serde_json::from_str(CATALOG_JSON).expect("schemas/catalog/metrics.json is valid"))
    }

    pub fn get(&self, metric: &str) -> Option<&MetricSpec> {
        self.metrics.get(metric)
    }

    /// Converts `value unit` (or a category with its duration) to the metric's canonical unit and
    /// checks the plausible range. `duration_min` is the sample's duration, the value of category samples.
    pub fn normalise(
        &self,
        metric: &str,
        value: Option<f64>,
        unit: Option<&str>,
        category: Option<&str>,
        duration_min: f64,
    ) -> Result<Normalised, NormaliseError> {
        let spec = self.get(metric).ok_or_else(|| NormaliseError::UnknownMetric(metric.to_owned()))?;
        if spec.kind == MetricKind::Category {
            let category = category.ok_or_else(|| NormaliseError::MissingCategory(metric.to_owned()))?;
            if !spec.categories.iter().any(|c| c == category) {
                return Err(NormaliseError::UnknownCategory {
                    metric: metric.to_owned(),
                    category: category.to_owned(),
                    accepted: spec.categories.join(", "),
                });
            }
            check_range(spec, duration_min)?;
            return Ok(Normalised { value: duration_min, unit: spec.unit.clone(), category: Some(category.to_owned()) });
        }
        let (Some(value), Some(unit)) = (value, unit) else {
            return Err(NormaliseError::MissingValue(metric.to_owned()));
        };
        if !value.is_finite() {
            return Err(NormaliseError::NotFinite);
        }
        let [factor, offset] = *spec.units.get(unit).ok_or_else(|| NormaliseError::UnconvertibleUnit {
            metric: metric.to_owned(),
            unit: unit.to_owned(),
            accepted: spec.units.keys().cloned().collect::<Vec<_>>().join(", "),
        })?;
        let canonical = value * factor + offset;
        check_range(spec, canonical)?;
        Ok(Normalised { value: canonical, unit: spec.unit.clone(), category: None })
    }
}

fn check_range(spec: &MetricSpec, value: f64) -> Result<(), NormaliseError> {
    if !value.is_finite() {
        return Err(NormaliseError::NotFinite);
    }
    let [min, max] = spec.range;
    // A tiny tolerance so that e.g. 212 degF (100.00000000000001 degC) is not rejected by rounding.
    let eps = 1e-9 * (max - min).abs().max(1.0);
    if value < min - eps || value > max + eps {
        return Err(NormaliseError::OutOfRange { value, unit: spec.unit.clone(), min, max });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_consistent() {
        let c = Catalog::embedded();
        assert!(c.metrics.len() >= 15);
        for (name, spec) in &c.metrics {
            assert!(spec.range[0] <= spec.range[1], "{name}: range");
            match spec.kind {
                MetricKind::Category => assert!(!spec.categories.is_empty(), "{name}: categories"),
                _ => {
                    let canonical = spec.units.get(&spec.unit).unwrap_or_else(|| panic!("{name}: canonical unit accepted"));
                    assert_eq!(*canonical, [1.0, 0.0], "{name}: canonical unit converts to itself");
                }
            }
        }
    }

    #[test]
    fn conversions_are_exact() {
        let c = Catalog::embedded();
        let n = |m: &str, v: f64, u: &str| c.normalise(m, Some(v), Some(u), None, 0.0).unwrap().value;
        assert_eq!(n("distance", 1.0, "mi"), 1609.344);
        assert_eq!(n("body_mass", 100.0, "lb"), 45.359237);
        assert!((n("body_temperature", 98.6, "degF") - 37.0).abs() < 1e-9);
        assert!((n("body_temperature", 310.15, "K") - 37.0).abs() < 1e-9);
        assert!((n("blood_glucose", 90.0, "mg/dL") - 4.9956704).abs() < 1e-6);
        assert_eq!(n("spo2", 0.97, "fraction"), 97.0);
        assert_eq!(n("hrv_sdnn", 0.045, "s"), 45.0);
        assert_eq!(n("heart_rate", 1.0, "count/s"), 60.0);
    }

    #[test]
    fn rejections_name_code_and_field() {
        let c = Catalog::embedded();
        let e = c.normalise("heart_rhythm", Some(1.0), Some("bpm"), None, 0.0).unwrap_err();
        assert_eq!((e.code(), e.field()), ("unknown_metric", "metric"));
        let e = c.normalise("heart_rate", Some(60.0), Some("kg"), None, 0.0).unwrap_err();
        assert_eq!((e.code(), e.field()), ("unconvertible_unit", "unit"));
        let e = c.normalise("heart_rate", Some(f64::NAN), Some("bpm"), None, 0.0).unwrap_err();
        assert_eq!((e.code(), e.field()), ("value_not_finite", "value"));
        let e = c.normalise("heart_rate", Some(900.0), Some("bpm"), None, 0.0).unwrap_err();
        assert_eq!((e.code(), e.field()), ("value_out_of_range", "value"));
        let e = c.normalise("sleep_stage", None, None, Some("dreaming"), 10.0).unwrap_err();
        assert_eq!((e.code(), e.field()), ("unknown_category", "category"));
        let ok = c.normalise("sleep_stage", None, None, Some("deep"), 42.5).unwrap();
        assert_eq!(ok, Normalised { value: 42.5, unit: "min".into(), category: Some("deep".into()) });
    }
}
