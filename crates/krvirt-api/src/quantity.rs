//! Kubernetes resource quantities (`128Mi`, `1.5Gi`, `2`, `500m`, `1e3`).
//!
//! The grammar is Kubernetes' `resource.Quantity`: a decimal number
//! (optionally signed, with an optional fraction) followed by either a
//! binary suffix (`Ki Mi Gi Ti Pi Ei`), a decimal suffix (`n u m k M G T P
//! E`, or none) or a decimal exponent (`e3`, `E-2`). Values are computed
//! exactly (128-bit integer arithmetic) and rounded up like
//! `Quantity.Value()` / `MilliValue()` do.

use std::borrow::Cow;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Schema, Type};

/// Why a quantity string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    #[error("quantity is empty")]
    Empty,
    #[error(
        "quantity {0:?} does not match the Kubernetes quantity syntax (e.g. 128Mi, 1.5Gi, 2, 500m)"
    )]
    Syntax(String),
    #[error("quantity {0:?} has an unknown suffix")]
    Suffix(String),
    #[error("quantity {0:?} is negative")]
    Negative(String),
    #[error("quantity {0:?} is too large")]
    TooLarge(String),
}

/// An exact non-negative rational `num / den`.
struct Exact {
    num: u128,
    den: u128,
}

fn pow(base: u128, exp: u32, original: &str) -> Result<u128, QuantityError> {
    base.checked_pow(exp)
        .ok_or_else(|| QuantityError::TooLarge(original.to_string()))
}

fn parse_exact(input: &str) -> Result<Exact, QuantityError> {
    let s = input;
    if s.is_empty() {
        return Err(QuantityError::Empty);
    }
    if s.len() > 64 {
        return Err(QuantityError::Syntax(input.to_string()));
    }
    let (negative, body) = match s.as_bytes()[0] {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    let number_end = body
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(body.len());
    let (number, suffix) = body.split_at(number_end);
    let (int_part, frac_part) = match number.split_once('.') {
        Some((i, f)) => (i, f),
        None => (number, ""),
    };
    if (int_part.is_empty() && frac_part.is_empty()) || frac_part.contains('.') {
        return Err(QuantityError::Syntax(input.to_string()));
    }
    let digits = format!("{int_part}{frac_part}");
    let digits = digits.trim_start_matches('0');
    if digits.len() > 36 {
        return Err(QuantityError::TooLarge(input.to_string()));
    }
    let mantissa: u128 = if digits.is_empty() {
        0
    } else {
        digits
            .parse()
            .map_err(|_| QuantityError::Syntax(input.to_string()))?
    };
    let frac_len =
        u32::try_from(frac_part.len()).map_err(|_| QuantityError::Syntax(input.to_string()))?;
    let mut num = mantissa;
    let mut den = pow(10, frac_len, input)?;

    // (binary base, power) or decimal power of ten.
    enum Mult {
        Bin(u32),
        Dec(i32),
    }
    let mult = match suffix {
        "" => Mult::Dec(0),
        "Ki" => Mult::Bin(1),
        "Mi" => Mult::Bin(2),
        "Gi" => Mult::Bin(3),
        "Ti" => Mult::Bin(4),
        "Pi" => Mult::Bin(5),
        "Ei" => Mult::Bin(6),
        "n" => Mult::Dec(-9),
        "u" => Mult::Dec(-6),
        "m" => Mult::Dec(-3),
        "k" => Mult::Dec(3),
        "M" => Mult::Dec(6),
        "G" => Mult::Dec(9),
        "T" => Mult::Dec(12),
        "P" => Mult::Dec(15),
        "E" => Mult::Dec(18),
        other => {
            let Some(exp) = other.strip_prefix(['e', 'E']) else {
                return Err(QuantityError::Suffix(input.to_string()));
            };
            let (sign, digits) = match exp.as_bytes().first() {
                Some(b'-') => (-1, &exp[1..]),
                Some(b'+') => (1, &exp[1..]),
                _ => (1, exp),
            };
            if digits.is_empty() || digits.len() > 3 || !digits.bytes().all(|c| c.is_ascii_digit())
            {
                return Err(QuantityError::Syntax(input.to_string()));
            }
            let e: i32 = digits
                .parse()
                .map_err(|_| QuantityError::Syntax(input.to_string()))?;
            Mult::Dec(sign * e)
        }
    };
    match mult {
        Mult::Bin(p) => {
            num = num
                .checked_mul(pow(1024, p, input)?)
                .ok_or_else(|| QuantityError::TooLarge(input.to_string()))?;
        }
        Mult::Dec(p) if p >= 0 => {
            let p = p.unsigned_abs();
            if mantissa != 0 {
                num = num
                    .checked_mul(pow(10, p, input)?)
                    .ok_or_else(|| QuantityError::TooLarge(input.to_string()))?;
            }
        }
        Mult::Dec(p) => {
            den = den
                .checked_mul(pow(10, p.unsigned_abs(), input)?)
                .ok_or_else(|| QuantityError::TooLarge(input.to_string()))?;
        }
    }
    if negative && num != 0 {
        return Err(QuantityError::Negative(input.to_string()));
    }
    Ok(Exact { num, den })
}

fn ceil_div(num: u128, den: u128, original: &str) -> Result<u64, QuantityError> {
    let q = num.div_ceil(den);
    u64::try_from(q).map_err(|_| QuantityError::TooLarge(original.to_string()))
}

/// Parse a quantity to its integer value (bytes for memory and disks),
/// rounding fractions up as Kubernetes' `Quantity.Value()` does:
/// `128Mi` → 134217728, `1.5Gi` → 1610612736, `1e3` → 1000, `500m` → 1.
pub fn parse_quantity(s: &str) -> Result<u64, QuantityError> {
    let e = parse_exact(s)?;
    ceil_div(e.num, e.den, s)
}

/// Parse a CPU quantity to thousandths of a CPU, rounding up as
/// `Quantity.MilliValue()` does: `2` → 2000, `500m` → 500, `0.5` → 500.
pub fn parse_cpu_millis(s: &str) -> Result<u64, QuantityError> {
    let e = parse_exact(s)?;
    let num = e
        .num
        .checked_mul(1000)
        .ok_or_else(|| QuantityError::TooLarge(s.to_string()))?;
    ceil_div(num, e.den, s)
}

/// A Kubernetes quantity kept in the exact form the user wrote it
/// (`"128Mi"`). JSON numbers are accepted on input and normalised to a
/// string, as Kubernetes does.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Quantity(pub String);

impl Quantity {
    pub fn new(s: impl Into<String>) -> Self {
        Quantity(s.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The integer value (bytes for memory), see [`parse_quantity`].
    pub fn value(&self) -> Result<u64, QuantityError> {
        parse_quantity(&self.0)
    }

    /// Thousandths of a unit (CPU millicores), see [`parse_cpu_millis`].
    pub fn millis(&self) -> Result<u64, QuantityError> {
        parse_cpu_millis(&self.0)
    }
}

impl std::fmt::Display for Quantity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for Quantity {
    fn from(s: &str) -> Self {
        Quantity(s.to_string())
    }
}

impl Serialize for Quantity {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Quantity {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Quantity;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a quantity (string such as \"128Mi\" or a number)")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Quantity, E> {
                Ok(Quantity(v.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Quantity, E> {
                Ok(Quantity(v.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Quantity, E> {
                Ok(Quantity(v.to_string()))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Quantity, E> {
                if v.is_finite() {
                    Ok(Quantity(v.to_string()))
                } else {
                    Err(E::custom("quantity must be a finite number"))
                }
            }
        }
        d.deserialize_any(V)
    }
}

impl utoipa::PartialSchema for Quantity {
    fn schema() -> RefOr<Schema> {
        OneOfBuilder::new()
            .item(ObjectBuilder::new().schema_type(Type::String))
            .item(ObjectBuilder::new().schema_type(Type::Number))
            .description(Some(
                "Kubernetes quantity: a decimal number with an optional binary (Ki, Mi, Gi, Ti, \
                 Pi, Ei) or decimal (m, k, M, G, T, P, E) suffix or exponent, e.g. \"128Mi\", \
                 \"1.5Gi\", \"2\", \"500m\". Numbers are accepted and stored as strings.",
            ))
            .into()
    }
}

impl utoipa::ToSchema for Quantity {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("Quantity")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MI: u64 = 1024 * 1024;

    #[test]
    fn binary_suffixes() {
        assert_eq!(parse_quantity("1Ki"), Ok(1024));
        assert_eq!(parse_quantity("128Mi"), Ok(128 * MI));
        assert_eq!(parse_quantity("2Gi"), Ok(2 * 1024 * MI));
        assert_eq!(parse_quantity("1Ti"), Ok(1 << 40));
        assert_eq!(parse_quantity("1Pi"), Ok(1 << 50));
        assert_eq!(parse_quantity("1Ei"), Ok(1 << 60));
        assert_eq!(parse_quantity("4096Mi"), Ok(4096 * MI));
    }

    #[test]
    fn decimal_suffixes_and_plain() {
        assert_eq!(parse_quantity("0"), Ok(0));
        assert_eq!(parse_quantity("42"), Ok(42));
        assert_eq!(parse_quantity("+42"), Ok(42));
        assert_eq!(parse_quantity("1k"), Ok(1000));
        assert_eq!(parse_quantity("1024M"), Ok(1_024_000_000));
        assert_eq!(parse_quantity("1G"), Ok(1_000_000_000));
        assert_eq!(parse_quantity("3T"), Ok(3_000_000_000_000));
        assert_eq!(parse_quantity("1P"), Ok(1_000_000_000_000_000));
        assert_eq!(parse_quantity("2E"), Ok(2_000_000_000_000_000_000));
    }

    #[test]
    fn decimals_round_up() {
        assert_eq!(parse_quantity("1.5Gi"), Ok(1536 * MI));
        assert_eq!(parse_quantity("0.5Ki"), Ok(512));
        assert_eq!(parse_quantity("1.5"), Ok(2));
        assert_eq!(parse_quantity(".5"), Ok(1));
        assert_eq!(parse_quantity("1."), Ok(1));
        assert_eq!(parse_quantity("0.1Ki"), Ok(103)); // 102.4 rounded up
        assert_eq!(parse_quantity("500m"), Ok(1));
        assert_eq!(parse_quantity("1000m"), Ok(1));
        assert_eq!(parse_quantity("1001m"), Ok(2));
    }

    #[test]
    fn exponents() {
        assert_eq!(parse_quantity("1e3"), Ok(1000));
        assert_eq!(parse_quantity("1E3"), Ok(1000));
        assert_eq!(parse_quantity("1.5e3"), Ok(1500));
        assert_eq!(parse_quantity("12e-1"), Ok(2));
        assert_eq!(parse_quantity("1e+2"), Ok(100));
        assert_eq!(parse_quantity("0e999"), Ok(0));
    }

    #[test]
    fn cpu_millis() {
        assert_eq!(parse_cpu_millis("2"), Ok(2000));
        assert_eq!(parse_cpu_millis("500m"), Ok(500));
        assert_eq!(parse_cpu_millis("0.5"), Ok(500));
        assert_eq!(parse_cpu_millis("1.5"), Ok(1500));
        assert_eq!(parse_cpu_millis("0.0001"), Ok(1)); // rounds up like MilliValue
        assert_eq!(parse_cpu_millis("100u"), Ok(1));
        assert_eq!(parse_cpu_millis("1k"), Ok(1_000_000));
    }

    #[test]
    fn errors() {
        assert_eq!(parse_quantity(""), Err(QuantityError::Empty));
        assert!(matches!(
            parse_quantity("abc"),
            Err(QuantityError::Syntax(_))
        ));
        assert!(matches!(parse_quantity("."), Err(QuantityError::Syntax(_))));
        assert!(matches!(
            parse_quantity("1.2.3"),
            Err(QuantityError::Syntax(_))
        ));
        assert!(matches!(
            parse_quantity("12Xi"),
            Err(QuantityError::Suffix(_))
        ));
        assert!(matches!(
            parse_quantity("12 Mi"),
            Err(QuantityError::Suffix(_))
        ));
        assert!(matches!(
            parse_quantity("12mi"),
            Err(QuantityError::Suffix(_))
        ));
        assert!(matches!(
            parse_quantity("1e"),
            Err(QuantityError::Syntax(_))
        ));
        assert!(matches!(
            parse_quantity("-1Gi"),
            Err(QuantityError::Negative(_))
        ));
        assert_eq!(parse_quantity("-0"), Ok(0));
        assert!(matches!(
            parse_quantity("16Ei"),
            Err(QuantityError::TooLarge(_))
        ));
        assert!(matches!(
            parse_quantity("1e30"),
            Err(QuantityError::TooLarge(_))
        ));
        assert!(matches!(
            parse_quantity("99999999999999999999999999999999999999999"),
            Err(QuantityError::TooLarge(_))
        ));
    }

    #[test]
    fn serde_accepts_strings_and_numbers() {
        let q: Quantity = serde_json::from_str("\"128Mi\"").expect("string");
        assert_eq!(q.value(), Ok(128 * MI));
        let q: Quantity = serde_json::from_str("2").expect("integer");
        assert_eq!(q, Quantity::from("2"));
        assert_eq!(q.millis(), Ok(2000));
        let q: Quantity = serde_json::from_str("0.5").expect("float");
        assert_eq!(q.millis(), Ok(500));
        assert_eq!(serde_json::to_string(&q).expect("ser"), "\"0.5\"");
        assert!(serde_json::from_str::<Quantity>("true").is_err());
    }
}
