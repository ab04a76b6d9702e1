//! Comparing a shadow's answer with the primary's: pure functions over two bodies.
//!
//! Both protocols' prediction outputs are read into named outputs made of rows:
//! - TF Serving row format, `{"predictions": [row, ...]}`, each row a number, a (nested)
//!   list, or an object of named outputs;
//! - TF Serving columnar format, `{"outputs": [row, ...]}` or `{"outputs": {"name": [row,
//!   ...]}}`;
//! - KServe V2, `{"outputs": [{"name", "shape", "data"}, ...]}`, rows along the first
//!   dimension of `shape`.
//!
//! Rows agree on top-1 when their argmax is the same. A row of one value is a label when
//! it is a whole number or a string (equal or not) and a probability otherwise (the same
//! side of 0.5). Anything else that parses as JSON is compared for equality.

use serde_json::Value;

/// Why two answers disagree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Same status; same top-1 on every row (or the same error status, or the same JSON).
    Agree,
    /// Different HTTP statuses.
    Status,
    /// Different outputs, row counts or row widths.
    Shape,
    /// Same shapes, different top-1 on at least one row.
    Top1,
    /// A successful answer that is not JSON (and not byte-for-byte equal to the other).
    NotJson,
    /// JSON without prediction outputs, and not equal.
    Other,
}

impl Verdict {
    /// Every verdict, in the order metrics and reports list them.
    pub const ALL: [Verdict; 6] = [
        Verdict::Agree,
        Verdict::Status,
        Verdict::Shape,
        Verdict::Top1,
        Verdict::NotJson,
        Verdict::Other,
    ];

    /// The label used in metrics and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Agree => "agree",
            Verdict::Status => "status",
            Verdict::Shape => "shape",
            Verdict::Top1 => "top1",
            Verdict::NotJson => "not_json",
            Verdict::Other => "other",
        }
    }
}

/// The result of comparing one pair of answers.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    /// Agreement, or the first reason found for disagreeing.
    pub verdict: Verdict,
    /// The largest absolute difference between numbers at the same place, when the
    /// outputs have the same shape.
    pub max_abs_diff: Option<f64>,
    /// Rows compared on top-1 (0 when the shapes differ or there are no outputs).
    pub rows: usize,
    /// Of those, rows whose top-1 agree.
    pub rows_agreeing: usize,
}

/// Compares two answers given as (status, body).
pub fn compare(primary: (u16, &[u8]), shadow: (u16, &[u8])) -> Comparison {
    let verdict_only = |verdict| Comparison {
        verdict,
        max_abs_diff: None,
        rows: 0,
        rows_agreeing: 0,
    };
    if primary.0 != shadow.0 {
        return verdict_only(Verdict::Status);
    }
    let success = (200..300).contains(&primary.0);
    if !success {
        // The same error from both sides: the candidate fails like the primary does.
        return verdict_only(Verdict::Agree);
    }
    match (extract(primary.1), extract(shadow.1)) {
        (Extracted::Outputs(a), Extracted::Outputs(b)) => compare_outputs(&a, &b),
        (Extracted::NotJson, _) | (_, Extracted::NotJson) => {
            if primary.1 == shadow.1 {
                verdict_only(Verdict::Agree)
            } else {
                verdict_only(Verdict::NotJson)
            }
        }
        (Extracted::Json(a), Extracted::Json(b)) => verdict_only(if a == b {
            Verdict::Agree
        } else {
            Verdict::Other
        }),
        _ => verdict_only(Verdict::Shape),
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Cell {
    Num(f64),
    Text(String),
}

#[derive(Debug, PartialEq)]
struct Output {
    name: String,
    rows: Vec<Vec<Cell>>,
}

#[derive(Debug)]
enum Extracted {
    Outputs(Vec<Output>),
    Json(Value),
    NotJson,
}

fn extract(body: &[u8]) -> Extracted {
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return Extracted::NotJson;
    };
    match outputs_of(&value) {
        Some(mut outputs) => {
            outputs.sort_by(|a, b| a.name.cmp(&b.name));
            Extracted::Outputs(outputs)
        }
        None => Extracted::Json(value),
    }
}

/// The prediction outputs of a response, or `None` when it has none we know.
fn outputs_of(value: &Value) -> Option<Vec<Output>> {
    let obj = value.as_object()?;
    if let Some(p) = obj.get("predictions") {
        return rows_format(p.as_array()?, "predictions");
    }
    match obj.get("outputs")? {
        Value::Array(items) if !items.is_empty() && items.iter().all(is_v2_output) => {
            items.iter().map(v2_output).collect()
        }
        Value::Array(rows) => rows_format(rows, "outputs"),
        Value::Object(named) => named
            .iter()
            .map(|(name, v)| {
                let rows = match v {
                    Value::Array(rows) => rows.iter().map(row).collect::<Option<_>>()?,
                    scalar => vec![row(scalar)?],
                };
                Some(Output {
                    name: name.clone(),
                    rows,
                })
            })
            .collect(),
        _ => None,
    }
}

/// TF Serving's row format: rows of values, or rows of named outputs.
fn rows_format(rows: &[Value], name: &str) -> Option<Vec<Output>> {
    if let Some(Value::Object(first)) = rows.first() {
        return first
            .keys()
            .map(|key| {
                let rows = rows
                    .iter()
                    .map(|r| row(r.as_object()?.get(key)?))
                    .collect::<Option<_>>()?;
                Some(Output {
                    name: key.clone(),
                    rows,
                })
            })
            .collect();
    }
    Some(vec![Output {
        name: name.to_string(),
        rows: rows.iter().map(row).collect::<Option<_>>()?,
    }])
}

fn is_v2_output(v: &Value) -> bool {
    v.as_object().is_some_and(|o| o.contains_key("data"))
}

/// A V2 output tensor, split into rows along the first dimension of its shape.
fn v2_output(v: &Value) -> Option<Output> {
    let o = v.as_object()?;
    let name = o
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let mut cells = Vec::new();
    flatten(o.get("data")?, &mut cells)?;
    let shape: Vec<usize> = o
        .get("shape")
        .and_then(Value::as_array)
        .map(|s| {
            s.iter()
                .filter_map(|d| d.as_u64())
                .map(|d| d as usize)
                .collect()
        })
        .unwrap_or_default();
    let rows = match shape.first() {
        Some(&n) if n > 0 && shape.iter().product::<usize>() == cells.len() => n,
        _ => 1,
    };
    let width = cells.len() / rows.max(1);
    let rows = if width == 0 {
        vec![Vec::new(); rows]
    } else {
        cells.chunks(width).map(<[Cell]>::to_vec).collect()
    };
    Some(Output { name, rows })
}

fn row(v: &Value) -> Option<Vec<Cell>> {
    let mut cells = Vec::new();
    flatten(v, &mut cells)?;
    Some(cells)
}

/// Numbers, booleans and strings in document order; `None` for objects and nulls.
fn flatten(v: &Value, out: &mut Vec<Cell>) -> Option<()> {
    match v {
        Value::Number(n) => out.push(Cell::Num(n.as_f64()?)),
        Value::Bool(b) => out.push(Cell::Num(f64::from(u8::from(*b)))),
        Value::String(s) => out.push(Cell::Text(s.clone())),
        Value::Array(items) => {
            for item in items {
                flatten(item, out)?;
            }
        }
        Value::Null | Value::Object(_) => return None,
    }
    Some(())
}

fn compare_outputs(a: &[Output], b: &[Output]) -> Comparison {
    let shape_differs = a.len() != b.len()
        || a.iter().zip(b).any(|(x, y)| {
            x.name != y.name
                || x.rows.len() != y.rows.len()
                || x.rows.iter().zip(&y.rows).any(|(r, s)| r.len() != s.len())
        });
    if shape_differs {
        return Comparison {
            verdict: Verdict::Shape,
            max_abs_diff: None,
            rows: 0,
            rows_agreeing: 0,
        };
    }
    let mut max_abs_diff: Option<f64> = None;
    let (mut rows, mut rows_agreeing) = (0, 0);
    for (x, y) in a.iter().zip(b) {
        for (r, s) in x.rows.iter().zip(&y.rows) {
            rows += 1;
            if top1_agrees(r, s) {
                rows_agreeing += 1;
            }
            for (c, d) in r.iter().zip(s) {
                if let (Cell::Num(c), Cell::Num(d)) = (c, d) {
                    let diff = (c - d).abs();
                    max_abs_diff = Some(max_abs_diff.map_or(diff, |m| m.max(diff)));
                }
            }
        }
    }
    Comparison {
        verdict: if rows_agreeing == rows {
            Verdict::Agree
        } else {
            Verdict::Top1
        },
        max_abs_diff,
        rows,
        rows_agreeing,
    }
}

fn top1_agrees(r: &[Cell], s: &[Cell]) -> bool {
    match (r, s) {
        ([Cell::Num(x)], [Cell::Num(y)]) => {
            if x.fract() == 0.0 && y.fract() == 0.0 {
                x == y
            } else {
                (*x >= 0.5) == (*y >= 0.5)
            }
        }
        _ => match (argmax(r), argmax(s)) {
            (Some(i), Some(j)) => i == j,
            // Rows with text (labels, classes): the whole row must match.
            _ => r == s,
        },
    }
}

/// One answered row as a person reads it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scored {
    /// The top-1 class (index in the row).
    pub class: usize,
    /// Its score.
    pub score: f64,
    /// Its score minus the runner-up's: small is borderline.
    pub margin: f64,
}

/// Each row of an answer's first output (by name) that scores two or more classes: its
/// top-1, score and margin. Empty for answers without such rows (labels, errors).
pub fn top_two(body: &[u8]) -> Vec<Scored> {
    let Extracted::Outputs(outputs) = extract(body) else {
        return Vec::new();
    };
    let Some(first) = outputs
        .into_iter()
        .find(|o| o.rows.iter().all(|r| r.len() >= 2))
    else {
        return Vec::new();
    };
    first
        .rows
        .iter()
        .filter_map(|row| {
            let class = argmax(row)?;
            let score = match row[class] {
                Cell::Num(x) => x,
                Cell::Text(_) => return None,
            };
            let second = row
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != class)
                .filter_map(|(_, c)| match c {
                    Cell::Num(x) => Some(*x),
                    Cell::Text(_) => None,
                })
                .fold(f64::NEG_INFINITY, f64::max);
            Some(Scored {
                class,
                score,
                margin: score - second,
            })
        })
        .collect()
}

/// Index of the largest number (the first on ties); `None` if a cell is not a number.
fn argmax(row: &[Cell]) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for (i, c) in row.iter().enumerate() {
        let Cell::Num(x) = c else { return None };
        if best.is_none_or(|(_, b)| *x > b) {
            best = Some((i, *x));
        }
    }
    best.map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_two_reads_rows_of_both_protocols() {
        let tf = top_two(br#"{"predictions": [[0.1, 0.7, 0.2], [0.45, 0.55, 0.0]]}"#);
        assert_eq!(tf.len(), 2);
        assert_eq!(tf[0].class, 1);
        assert!((tf[0].margin - 0.5).abs() < 1e-9);
        assert!((tf[1].margin - 0.1).abs() < 1e-9);
        let v2 = top_two(
            br#"{"outputs": [{"name": "p", "shape": [1, 3], "datatype": "FP32", "data": [0.3, 0.3, 0.4]}]}"#,
        );
        assert_eq!(v2[0].class, 2);
        assert!((v2[0].margin - 0.1).abs() < 1e-9);
        assert!(top_two(br#"{"predictions": [3, 4]}"#).is_empty());
        assert!(top_two(br#"{"error": "x"}"#).is_empty());
    }

    fn cmp(a: &str, b: &str) -> Comparison {
        compare((200, a.as_bytes()), (200, b.as_bytes()))
    }

    #[test]
    fn tf_rows_agree_on_argmax_and_report_the_largest_difference() {
        let c = cmp(
            r#"{"predictions": [[0.1, 0.7, 0.2], [0.6, 0.3, 0.1]]}"#,
            r#"{"predictions": [[0.2, 0.5, 0.3], [0.5, 0.4, 0.1]]}"#,
        );
        assert_eq!(c.verdict, Verdict::Agree);
        assert_eq!((c.rows, c.rows_agreeing), (2, 2));
        // |0.7 - 0.5| = 0.2 is the largest gap.
        assert!((c.max_abs_diff.unwrap() - 0.2).abs() < 1e-12);
    }

    #[test]
    fn one_row_changing_its_top_class_is_a_top1_disagreement() {
        let c = cmp(
            r#"{"predictions": [[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]]}"#,
            r#"{"predictions": [[0.1, 0.9], [0.4, 0.6], [0.3, 0.7]]}"#,
        );
        assert_eq!(c.verdict, Verdict::Top1);
        assert_eq!((c.rows, c.rows_agreeing), (3, 2));
        assert!((c.max_abs_diff.unwrap() - 0.4).abs() < 1e-12);
    }

    #[test]
    fn v2_outputs_split_rows_by_shape() {
        let a = r#"{"model_name":"m","outputs":[{"name":"probs","shape":[2,3],"datatype":"FP32","data":[0.1,0.8,0.1, 0.7,0.2,0.1]}]}"#;
        let b = r#"{"model_name":"m2","outputs":[{"name":"probs","shape":[2,3],"datatype":"FP32","data":[0.1,0.8,0.1, 0.2,0.7,0.1]}]}"#;
        let c = cmp(a, b);
        assert_eq!(c.verdict, Verdict::Top1);
        assert_eq!((c.rows, c.rows_agreeing), (2, 1));
        // Read as one flat row the two would agree (argmax at 1 both times): rows matter.
        let flat_b = b.replace("[2,3]", "[6]");
        assert_eq!(cmp(a, &flat_b).verdict, Verdict::Shape);
    }

    #[test]
    fn different_shapes_are_reported_as_such() {
        let c = cmp(
            r#"{"predictions": [[0.1, 0.9]]}"#,
            r#"{"predictions": [[0.1, 0.8, 0.1]]}"#,
        );
        assert_eq!(c.verdict, Verdict::Shape);
        assert_eq!(c.max_abs_diff, None);
        let c = cmp(
            r#"{"predictions": [[0.1, 0.9]]}"#,
            r#"{"predictions": [[0.1, 0.9], [0.5, 0.5]]}"#,
        );
        assert_eq!(c.verdict, Verdict::Shape);
        let c = cmp(r#"{"predictions": [1]}"#, r#"{"outputs": {"x": [1]}}"#);
        assert_eq!(c.verdict, Verdict::Shape);
    }

    #[test]
    fn labels_compare_exactly_and_probabilities_by_side_of_one_half() {
        assert_eq!(
            cmp(r#"{"predictions":[3, 7]}"#, r#"{"predictions":[3, 7]}"#).verdict,
            Verdict::Agree
        );
        assert_eq!(
            cmp(r#"{"predictions":[3, 7]}"#, r#"{"predictions":[3, 1]}"#).verdict,
            Verdict::Top1
        );
        assert_eq!(
            cmp(r#"{"predictions":[0.9]}"#, r#"{"predictions":[0.6]}"#).verdict,
            Verdict::Agree
        );
        assert_eq!(
            cmp(r#"{"predictions":[0.9]}"#, r#"{"predictions":[0.4]}"#).verdict,
            Verdict::Top1
        );
        assert_eq!(
            cmp(r#"{"predictions":["cat"]}"#, r#"{"predictions":["dog"]}"#).verdict,
            Verdict::Top1
        );
    }

    #[test]
    fn named_outputs_in_rows_and_columns() {
        let rows =
            r#"{"predictions":[{"probs":[0.2,0.8],"label":1},{"probs":[0.9,0.1],"label":0}]}"#;
        let cols = r#"{"outputs":{"label":[1,0],"probs":[[0.2,0.8],[0.9,0.1]]}}"#;
        let c = cmp(rows, cols);
        assert_eq!(c.verdict, Verdict::Agree);
        assert_eq!((c.rows, c.rows_agreeing), (4, 4));
        assert_eq!(c.max_abs_diff, Some(0.0));
    }

    #[test]
    fn statuses_non_json_and_other_json() {
        let ok = br#"{"predictions":[[1,0]]}"#.as_slice();
        assert_eq!(compare((200, ok), (500, b"boom")).verdict, Verdict::Status);
        assert_eq!(compare((503, b"a"), (503, b"b")).verdict, Verdict::Agree);
        assert_eq!(
            compare((200, b"<html>"), (200, ok)).verdict,
            Verdict::NotJson
        );
        assert_eq!(
            compare((200, b"plain"), (200, b"plain")).verdict,
            Verdict::Agree
        );
        assert_eq!(cmp(r#"{"x":1}"#, r#"{"x":1}"#).verdict, Verdict::Agree);
        assert_eq!(cmp(r#"{"x":1}"#, r#"{"x":2}"#).verdict, Verdict::Other);
    }
}
