//! The first phase of reading `tenement.toml`: the document as a tree that remembers where
//! every key and every array element was written, and nothing else.
//!
//! There is no schema here on purpose. serde-derived structs with `deny_unknown_fields` stop
//! at the first unknown key or mistyped value; [`super::validate`] walks this tree instead and
//! refuses unknown keys itself, so one run reports every problem in the file.
//!
//! Why keys carry the position and values mostly do not: `toml::Spanned` cannot wrap a table
//! that was never written as a header (`[service.notes.env]` alone makes `service.notes`
//! implicit) and fails on it, while every key has a place in the text. Array elements are
//! always written out, so they are spanned.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use toml::Spanned;

/// A value of the document.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum RawValue {
    String(String),
    Integer(i64),
    Float(f64),
    Boolean(bool),
    Array(Vec<Spanned<toml::Value>>),
    Table(RawTable),
}

/// One `key = value` of a table, in file order.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct RawEntry {
    pub key: Spanned<String>,
    pub value: RawValue,
}

/// A table's entries in file order (TOML already refuses a key written twice).
#[derive(Debug, Clone, PartialEq, Default)]
pub(super) struct RawTable {
    pub entries: Vec<RawEntry>,
}

impl RawTable {
    pub fn get(&self, key: &str) -> Option<&RawEntry> {
        self.entries.iter().find(|e| e.key.get_ref() == key)
    }
}

impl RawValue {
    /// The value's kind with an article, for messages: "an integer".
    pub fn kind(&self) -> &'static str {
        match self {
            RawValue::String(_) => "a string",
            RawValue::Integer(_) => "an integer",
            RawValue::Float(_) => "a float",
            RawValue::Boolean(_) => "a boolean",
            RawValue::Array(_) => "an array",
            RawValue::Table(_) => "a table",
        }
    }
}

/// [`RawValue::kind`] for the values inside arrays.
pub(super) fn value_kind(value: &toml::Value) -> &'static str {
    match value {
        toml::Value::String(_) => "a string",
        toml::Value::Integer(_) => "an integer",
        toml::Value::Float(_) => "a float",
        toml::Value::Boolean(_) => "a boolean",
        toml::Value::Datetime(_) => "a date",
        toml::Value::Array(_) => "an array",
        toml::Value::Table(_) => "a table",
    }
}

/// Parses `text` as TOML; the error is a syntax error (or a date outside an array, which the
/// tree cannot hold and no key accepts).
pub(super) fn parse(text: &str) -> Result<RawTable, toml::de::Error> {
    toml::from_str(text)
}

impl<'de> Deserialize<'de> for RawTable {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(RawVisitor).and_then(|value| match value {
            RawValue::Table(table) => Ok(table),
            other => Err(de::Error::custom(format!(
                "expected a table, found {}",
                other.kind()
            ))),
        })
    }
}

impl<'de> Deserialize<'de> for RawValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(RawVisitor)
    }
}

struct RawVisitor;

impl<'de> Visitor<'de> for RawVisitor {
    type Value = RawValue;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a TOML value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<RawValue, E> {
        Ok(RawValue::Boolean(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawValue, E> {
        Ok(RawValue::Integer(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawValue, E> {
        i64::try_from(v)
            .map(RawValue::Integer)
            .map_err(|_| E::custom(format!("integer {v} is too large")))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<RawValue, E> {
        Ok(RawValue::Float(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<RawValue, E> {
        Ok(RawValue::String(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<RawValue, E> {
        Ok(RawValue::String(v))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawValue, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Spanned<toml::Value>>()? {
            items.push(item);
        }
        Ok(RawValue::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawValue, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<Spanned<String>>()? {
            let value = map.next_value::<RawValue>()?;
            entries.push(RawEntry { key, value });
        }
        Ok(RawValue::Table(RawTable { entries }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_implicit_and_dotted_tables_keep_their_place() {
        let text = "[service.notes.env]\nA = 'x'\n[settings]\nlisten.x = 1\n";
        let doc = parse(text).expect("valid toml");
        let service = doc.get("service").expect("service");
        let RawValue::Table(services) = &service.value else {
            panic!("service is a table");
        };
        let notes = services.get("notes").expect("notes");
        assert_eq!(&text[notes.key.span()], "notes");
        let RawValue::Table(notes) = &notes.value else {
            panic!("notes is a table");
        };
        let RawValue::Table(env) = &notes.get("env").expect("env").value else {
            panic!("env is a table");
        };
        assert_eq!(env.entries[0].key.span(), 20..21);
        assert_eq!(env.entries[0].value, RawValue::String("x".into()));
    }

    #[test]
    fn array_elements_are_spanned_and_dates_inside_arrays_parse() {
        let text = "a = ['x', 1979-05-27]\n";
        let doc = parse(text).expect("valid toml");
        let RawValue::Array(items) = &doc.entries[0].value else {
            panic!("array");
        };
        assert_eq!(&text[items[0].span()], "'x'");
        assert_eq!(value_kind(items[1].get_ref()), "a date");
    }
}
