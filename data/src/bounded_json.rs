//! JSON records parsed under a byte budget.
//!
//! A JSON text's size says little about its parsed size: a 60 MiB line of tiny
//! numbers becomes gigabytes of `serde_json::Value`s. A record is therefore
//! built by a visitor that charges every value its in-memory cost (a fixed
//! [`VALUE_COST`] plus the bytes of its strings and keys) and stops as soon as
//! the record would cost more than the limit (`data.limits.max_value_bytes`).
//! For a JSON array read from a file, [`Metered`] also bounds the bytes one
//! element may span, so a single huge string is refused while it is read, not
//! after it is held.

use std::cell::Cell;
use std::fmt;
use std::io::Read;
use std::rc::Rc;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

use crate::error::Refusal;

/// What one value is charged besides its text: about what a `Value` and its
/// slot in a `Vec` or map cost.
pub const VALUE_COST: u64 = 64;

/// Marks the error of a record over its budget (found again in the message).
pub const OVER: &str = "decodes to more than";

/// The budget left to a record being parsed.
#[derive(Debug, Clone)]
pub struct Budget {
    left: Rc<Cell<u64>>,
    limit: u64,
}

impl Budget {
    pub fn new(limit: u64) -> Self {
        Budget {
            left: Rc::new(Cell::new(limit)),
            limit,
        }
    }

    fn charge<E: serde::de::Error>(&self, bytes: usize) -> Result<(), E> {
        let cost = VALUE_COST + bytes as u64;
        match self.left.get().checked_sub(cost) {
            Some(left) => {
                self.left.set(left);
                Ok(())
            }
            None => Err(E::custom(format!(
                "the record {OVER} data.limits.max_value_bytes = {} bytes",
                self.limit
            ))),
        }
    }
}

/// Parses `text` into a value that costs at most `limit` bytes.
pub fn parse(text: &str, limit: u64) -> Result<Value, Refusal> {
    let mut de = serde_json::Deserializer::from_str(text);
    let v = Bounded(Budget::new(limit))
        .deserialize(&mut de)
        .map_err(|e| Refusal(format!("invalid JSON: {e}")))?;
    de.end()
        .map_err(|e| Refusal(format!("invalid JSON: {e}")))?;
    Ok(v)
}

/// A value parsed under a [`Budget`].
#[derive(Debug, Clone)]
pub struct Bounded(pub Budget);

impl<'de> DeserializeSeed<'de> for Bounded {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Bounded {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Value, E> {
        self.0.charge(0)?;
        Ok(Value::Bool(v))
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Value, E> {
        self.0.charge(0)?;
        Ok(Value::from(v))
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Value, E> {
        self.0.charge(0)?;
        Ok(Value::from(v))
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Value, E> {
        self.0.charge(0)?;
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Value, E> {
        self.0.charge(v.len())?;
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Value, E> {
        self.0.charge(v.len())?;
        Ok(Value::String(v))
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<Value, E> {
        self.0.charge(0)?;
        Ok(Value::Null)
    }
    fn visit_none<E: serde::de::Error>(self) -> Result<Value, E> {
        self.visit_unit()
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        self.0.charge(0)?;
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(self.clone())? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        self.0.charge(0)?;
        let mut out = Map::new();
        while let Some(k) = map.next_key::<String>()? {
            self.0.charge(k.len())?;
            let v = map.next_value_seed(self.clone())?;
            out.insert(k, v);
        }
        Ok(Value::Object(out))
    }
}

/// A reader that fails once more than `limit` bytes were read since the last
/// [`Meter::reset`]: one element of a JSON array may not span more.
#[derive(Debug)]
pub struct Metered<R> {
    inner: R,
    meter: Meter,
}

/// The shared count of a [`Metered`] reader.
#[derive(Debug, Clone)]
pub struct Meter {
    read: Rc<Cell<u64>>,
    limit: u64,
}

impl Meter {
    pub fn reset(&self) {
        self.read.set(0);
    }
}

impl<R: Read> Metered<R> {
    pub fn new(inner: R, limit: u64) -> (Self, Meter) {
        let meter = Meter {
            read: Rc::new(Cell::new(0)),
            limit,
        };
        (
            Metered {
                inner,
                meter: meter.clone(),
            },
            meter,
        )
    }
}

impl<R: Read> Read for Metered<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let total = self.meter.read.get() + n as u64;
        self.meter.read.set(total);
        if total > self.meter.limit {
            return Err(std::io::Error::other(format!(
                "an element spans more than data.limits.max_value_bytes = {} bytes",
                self.meter.limit
            )));
        }
        Ok(n)
    }
}

/// Errors of serde_json over a [`Metered`] reader, as a message.
pub fn message(e: &serde_json::Error) -> String {
    format!("invalid JSON: {e}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_within_its_budget_parses_as_serde_json_does() {
        let text = r#"{"prompt": "a", "ids": [1, 2, 3], "x": {"y": null, "z": 1.5}}"#;
        let v = parse(text, 1 << 20).expect("parses");
        assert_eq!(v, serde_json::from_str::<Value>(text).expect("json"));
    }

    #[test]
    fn many_tiny_values_are_charged_their_memory() {
        // 100,000 numbers in 200 KB of text cost 6.4 MB as values.
        let text = format!("{{\"ids\": [{}]}}", vec!["1"; 100_000].join(","));
        let err = parse(&text, 1 << 20).expect_err("over budget");
        assert!(err.contains(OVER), "{err}");
        assert!(
            err.contains("data.limits.max_value_bytes = 1048576"),
            "{err}"
        );
        assert!(parse(&text, 8 << 20).is_ok());
    }

    #[test]
    fn a_metered_reader_stops_inside_a_long_element() {
        let text = format!("[\"{}\"]", "a".repeat(10_000));
        let (r, _meter) = Metered::new(text.as_bytes(), 4096);
        let err = serde_json::from_reader::<_, Value>(r).expect_err("too long");
        assert!(message(&err).contains("spans more than"), "{err}");
    }
}
