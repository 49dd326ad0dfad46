//! Generic message values: MessagePack → JSON conversion and nesting checks.

use serde_json::{Map, Number, Value};

/// Why a MessagePack value has no JSON equivalent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NotJson {
    Binary,
    Extension,
    NonStringKey,
    InvalidUtf8,
    NonFiniteFloat,
}

impl NotJson {
    pub(crate) fn describe(&self) -> &'static str {
        match self {
            NotJson::Binary => "binary values have no JSON equivalent",
            NotJson::Extension => "extension types have no JSON equivalent",
            NotJson::NonStringKey => "map keys must be strings",
            NotJson::InvalidUtf8 => "strings must be valid UTF-8",
            NotJson::NonFiniteFloat => "NaN and infinite floats have no JSON equivalent",
        }
    }
}

/// Converts a MessagePack value into its JSON equivalent.
pub(crate) fn msgpack_to_json(v: rmpv::Value) -> Result<Value, NotJson> {
    Ok(match v {
        rmpv::Value::Nil => Value::Null,
        rmpv::Value::Boolean(b) => Value::Bool(b),
        rmpv::Value::Integer(i) => {
            if let Some(u) = i.as_u64() {
                Value::Number(u.into())
            } else if let Some(s) = i.as_i64() {
                Value::Number(s.into())
            } else {
                // rmpv integers are always u64 or i64.
                return Err(NotJson::NonFiniteFloat);
            }
        }
        rmpv::Value::F32(f) => float(f64::from(f))?,
        rmpv::Value::F64(f) => float(f)?,
        rmpv::Value::String(s) => Value::String(s.into_str().ok_or(NotJson::InvalidUtf8)?),
        rmpv::Value::Binary(_) => return Err(NotJson::Binary),
        rmpv::Value::Array(items) => Value::Array(
            items
                .into_iter()
                .map(msgpack_to_json)
                .collect::<Result<_, _>>()?,
        ),
        rmpv::Value::Map(entries) => {
            let mut map = Map::with_capacity(entries.len());
            for (k, v) in entries {
                let key = match k {
                    rmpv::Value::String(s) => s.into_str().ok_or(NotJson::InvalidUtf8)?,
                    _ => return Err(NotJson::NonStringKey),
                };
                map.insert(key, msgpack_to_json(v)?);
            }
            Value::Object(map)
        }
        rmpv::Value::Ext(..) => return Err(NotJson::Extension),
    })
}

fn float(f: f64) -> Result<Value, NotJson> {
    Number::from_f64(f)
        .map(Value::Number)
        .ok_or(NotJson::NonFiniteFloat)
}

/// Nesting depth of maps and arrays: a scalar is 0, `{}` is 1, `{"a":[]}` is 2.
pub(crate) fn depth(v: &Value) -> usize {
    // Iterative, so that a hostile value cannot exhaust the stack here.
    let mut max = 0;
    let mut stack: Vec<(&Value, usize)> = vec![(v, 0)];
    while let Some((v, d)) = stack.pop() {
        match v {
            Value::Array(items) => {
                max = max.max(d + 1);
                stack.extend(items.iter().map(|i| (i, d + 1)));
            }
            Value::Object(map) => {
                max = max.max(d + 1);
                stack.extend(map.values().map(|i| (i, d + 1)));
            }
            _ => {}
        }
    }
    max
}

/// Nesting depth of a MessagePack value, counted like [`depth`].
pub(crate) fn msgpack_depth(v: &rmpv::Value) -> usize {
    let mut max = 0;
    let mut stack: Vec<(&rmpv::Value, usize)> = vec![(v, 0)];
    while let Some((v, d)) = stack.pop() {
        match v {
            rmpv::Value::Array(items) => {
                max = max.max(d + 1);
                stack.extend(items.iter().map(|i| (i, d + 1)));
            }
            rmpv::Value::Map(entries) => {
                max = max.max(d + 1);
                for (k, v) in entries {
                    stack.push((k, d + 1));
                    stack.push((v, d + 1));
                }
            }
            _ => {}
        }
    }
    max
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn depth_counts_containers() {
        assert_eq!(depth(&json!(1)), 0);
        assert_eq!(depth(&json!({})), 1);
        assert_eq!(depth(&json!({"a": [1, {"b": []}]})), 4);
    }

    #[test]
    fn msgpack_values_without_json_equivalent_are_refused() {
        assert_eq!(
            msgpack_to_json(rmpv::Value::Binary(vec![1])),
            Err(NotJson::Binary)
        );
        assert_eq!(
            msgpack_to_json(rmpv::Value::Ext(1, vec![1])),
            Err(NotJson::Extension)
        );
        assert_eq!(
            msgpack_to_json(rmpv::Value::F64(f64::NAN)),
            Err(NotJson::NonFiniteFloat)
        );
        assert_eq!(
            msgpack_to_json(rmpv::Value::Map(vec![(
                rmpv::Value::from(1),
                rmpv::Value::Nil
            )])),
            Err(NotJson::NonStringKey)
        );
        assert_eq!(
            msgpack_to_json(rmpv::Value::Array(vec![rmpv::Value::from(-3)])),
            Ok(json!([-3]))
        );
    }
}
