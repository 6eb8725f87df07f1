//! A reader of the Prometheus text exposition format, for the metrics node proxies and
//! waypoints report: `name{label="value",...} value [timestamp]` lines, `#` lines
//! skipped. Only samples whose name `wanted` accepts are kept. The input is untrusted (a
//! reporter may be compromised or broken): every line is bounded, errors name the line,
//! and nothing panics.

/// The most samples kept from one report.
pub const MAX_SAMPLES: usize = 200_000;
/// The most labels on one sample.
pub const MAX_LABELS: usize = 64;

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, name: &str) -> &str {
        self.labels
            .iter()
            .find(|(k, _)| k == name)
            .map_or("", |(_, v)| v.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("metrics line {line}: {why}")]
pub struct ParseError {
    pub line: usize,
    pub why: &'static str,
}

/// The samples of `text` that `wanted` accepts by name.
pub fn parse(text: &str, wanted: impl Fn(&str) -> bool) -> Result<Vec<Sample>, ParseError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |why| ParseError { line: i + 1, why };
        let name_end = line
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(line.len());
        let name = &line[..name_end];
        if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(bad("no metric name"));
        }
        if !wanted(name) {
            continue;
        }
        let mut rest = &line[name_end..];
        let mut labels = Vec::new();
        if let Some(after) = rest.strip_prefix('{') {
            let (parsed, tail) = read_labels(after).map_err(bad)?;
            labels = parsed;
            rest = tail;
        }
        let mut fields = rest.split_whitespace();
        let value = fields.next().ok_or_else(|| bad("no value"))?;
        let value = match value {
            "+Inf" | "Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse::<f64>()
                .map_err(|_| bad("the value is not a number"))?,
        };
        if out.len() == MAX_SAMPLES {
            return Err(bad("too many samples"));
        }
        out.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    Ok(out)
}

/// `k="v",...}` and what follows the closing brace.
type Labels<'a> = (Vec<(String, String)>, &'a str);

fn read_labels(mut s: &str) -> Result<Labels<'_>, &'static str> {
    let mut labels = Vec::new();
    loop {
        s = s.trim_start();
        if let Some(tail) = s.strip_prefix('}') {
            return Ok((labels, tail));
        }
        let eq = s.find('=').ok_or("a label without =")?;
        let key = s[..eq].trim();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err("a label name that is not one");
        }
        s = s[eq + 1..].trim_start();
        s = s.strip_prefix('"').ok_or("a label value without quotes")?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err("an unterminated label value"),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => return Err("an unterminated label value"),
                },
                Some((_, c)) => value.push(c),
            }
        };
        if labels.len() == MAX_LABELS {
            return Err("too many labels");
        }
        labels.push((key.to_owned(), value));
        s = s[end + 1..].trim_start();
        if let Some(tail) = s.strip_prefix(',') {
            s = tail;
        } else if !s.starts_with('}') {
            return Err("labels not separated by commas");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_with_labels_escapes_and_special_values() {
        let text = "# HELP x help\n# TYPE x counter\nx_total{a=\"1\",b=\"q\\\"uote\\\\ and\\nline\"} 42\nskipped 1\ny_bucket{le=\"+Inf\",} 7 1700000000\nz +Inf\n";
        let got = parse(text, |n| n != "skipped").unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].name, "x_total");
        assert_eq!(got[0].label("b"), "q\"uote\\ and\nline");
        assert_eq!(got[0].value, 42.0);
        assert_eq!(got[1].label("le"), "+Inf");
        assert_eq!(got[1].value, 7.0);
        assert!(got[2].value.is_infinite());
        assert_eq!(got[0].label("missing"), "");
    }

    #[test]
    fn malformed_lines_are_errors_with_their_number() {
        for bad in [
            "x{a=1} 2",
            "x{a=\"1\" 2",
            "x{a=\"1\"b=\"2\"} 3",
            "x{=\"1\"} 2",
            "x 1.2.3",
            "x",
            "{a=\"1\"} 2",
            "x{a=\"unterminated} 1",
        ] {
            let e = parse(&format!("ok 1\n{bad}\n"), |_| true).unwrap_err();
            assert_eq!(e.line, 2, "{bad}: {e}");
        }
    }
}
