//! Numbers in staging documents. n8n sends int32, double or numeric strings, other producers
//! int64 or decimal128; all are read exactly enough to tell a whole count from a fraction,
//! and NaN, infinities and text that is not a plain decimal number are invalid.

use mongodb::bson::Bson;

/// Largest integer that a double represents exactly (2^53); counts above it are refused
/// rather than rounded.
const MAX_EXACT_INTEGER: f64 = 9_007_199_254_740_992.0;

/// A finite number read from a staging field.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Number {
    pub value: f64,
    /// The value as an integer, when it is exactly whole.
    pub whole: Option<i64>,
}

/// Reads a number of any accepted BSON type.
///
/// # Errors
///
/// A reason fragment such as `"abc" is not a number` for a value of another type, a string
/// that is not a decimal number, NaN or an infinity.
pub fn parse(value: &Bson) -> Result<Number, String> {
    match value {
        Bson::Int32(int) => Ok(Number::from_integer(i64::from(*int))),
        Bson::Int64(int) => Ok(Number::from_integer(*int)),
        Bson::Double(double) => from_double(*double),
        Bson::Decimal128(decimal) => parse_text(&decimal.to_string())
            .map_err(|_| format!("decimal128 {decimal} is not a finite number")),
        Bson::String(text) => parse_text(text),
        other => Err(format!("{} is not a number", describe(other))),
    }
}

/// Reads a non-negative whole number, such as a count of cases or survey answers.
///
/// # Errors
///
/// A reason fragment naming the value when it is not a number, not whole or negative.
pub fn parse_count(value: &Bson) -> Result<i64, String> {
    const RULE: &str = "counts must be whole numbers >= 0";
    let number = parse(value).map_err(|reason| format!("{reason}; {RULE}"))?;
    let Some(whole) = number.whole else {
        return Err(format!("{} is not a whole number; {RULE}", describe(value)));
    };
    if whole < 0 {
        return Err(format!("{} is negative; {RULE}", describe(value)));
    }
    Ok(whole)
}

/// Reads a non-negative number, such as an average solution time.
///
/// # Errors
///
/// A reason fragment naming the value when it is not a number or negative.
pub fn parse_non_negative(value: &Bson) -> Result<f64, String> {
    const RULE: &str = "times must be numbers >= 0";
    let number = parse(value).map_err(|reason| format!("{reason}; {RULE}"))?;
    if number.value < 0.0 {
        return Err(format!("{} is negative; {RULE}", describe(value)));
    }
    Ok(number.value)
}

/// Reads a percentage between 0 and 100 inclusive.
///
/// # Errors
///
/// A reason fragment naming the value when it is not a number or outside 0..100.
pub fn parse_percent(value: &Bson) -> Result<f64, String> {
    const RULE: &str = "percentages must be numbers from 0 to 100";
    let number = parse(value).map_err(|reason| format!("{reason}; {RULE}"))?;
    if !(0.0..=100.0).contains(&number.value) {
        return Err(format!("{} is outside 0..100; {RULE}", describe(value)));
    }
    Ok(number.value)
}

impl Number {
    fn from_integer(int: i64) -> Number {
        Number {
            value: int as f64,
            whole: Some(int),
        }
    }
}

fn from_double(double: f64) -> Result<Number, String> {
    if !double.is_finite() {
        return Err(format!("{double} is not a finite number"));
    }
    let whole =
        (double.fract() == 0.0 && double.abs() <= MAX_EXACT_INTEGER).then_some(double as i64);
    Ok(Number {
        value: double,
        whole,
    })
}

/// Parses a plain decimal number (`7`, ` 2.5 `, `-3`, `1e3`, `.5`), deciding wholeness from
/// the digits themselves so that `7.000000000000001` is not mistaken for 7.
fn parse_text(raw: &str) -> Result<Number, String> {
    let text = raw.trim();
    let invalid = || format!("{:?} is not a number", truncate(raw));
    let unsigned = text.strip_prefix(['+', '-']).unwrap_or(text);
    let (mantissa, exponent) = match unsigned.find(['e', 'E']) {
        Some(index) => (&unsigned[..index], Some(&unsigned[index + 1..])),
        None => (unsigned, None),
    };
    let (integer_part, fraction_part) = match mantissa.split_once('.') {
        Some((integer_part, fraction_part)) => (integer_part, fraction_part),
        None => (mantissa, ""),
    };
    let all_digits = |part: &str| part.bytes().all(|byte| byte.is_ascii_digit());
    if integer_part.is_empty() && fraction_part.is_empty()
        || !all_digits(integer_part)
        || !all_digits(fraction_part)
    {
        return Err(invalid());
    }
    let exponent: i64 = match exponent {
        Some(exponent) => {
            let digits = exponent.strip_prefix(['+', '-']).unwrap_or(exponent);
            if digits.is_empty() || !all_digits(digits) || digits.len() > 6 {
                return Err(invalid());
            }
            exponent.parse().map_err(|_| invalid())?
        }
        None => 0,
    };
    let value: f64 = text.parse().map_err(|_| invalid())?;
    if !value.is_finite() {
        return Err(format!("{:?} is not a finite number", truncate(raw)));
    }

    // The value is whole when no non-zero digit stands right of the decimal point once the
    // exponent has moved it.
    let digits: Vec<u8> = integer_part.bytes().chain(fraction_part.bytes()).collect();
    let point = integer_part.len() as i64 + exponent;
    let first_fraction_digit = point.clamp(0, digits.len() as i64) as usize;
    let is_whole = digits[first_fraction_digit..]
        .iter()
        .all(|digit| *digit == b'0');
    let whole = (is_whole && value.abs() <= MAX_EXACT_INTEGER).then_some(value as i64);
    Ok(Number { value, whole })
}

/// Renders a BSON value for a reject reason, shortened so one reason stays one line.
pub fn describe(value: &Bson) -> String {
    match value {
        Bson::String(text) => format!("{:?}", truncate(text)),
        other => {
            let text = other.to_string();
            truncate(&text).to_string()
        }
    }
}

fn truncate(text: &str) -> &str {
    const MAX_CHARS: usize = 60;
    match text.char_indices().nth(MAX_CHARS) {
        Some((index, _)) => &text[..index],
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::Decimal128;

    fn decimal(text: &str) -> Bson {
        Bson::Decimal128(
            text.parse::<Decimal128>()
                .expect("valid decimal128 literal"),
        )
    }

    #[test]
    fn counts_accept_every_numeric_type() {
        let cases = [
            (Bson::Int32(15), 15),
            (Bson::Int64(15), 15),
            (Bson::Double(15.0), 15),
            (decimal("15.00"), 15),
            (Bson::String(" 7 ".into()), 7),
            (Bson::String("15.0".into()), 15),
            (Bson::String("1e2".into()), 100),
            (Bson::String("+3".into()), 3),
            (Bson::Int32(0), 0),
        ];
        for (value, expected) in cases {
            assert_eq!(parse_count(&value), Ok(expected), "{value:?}");
        }
    }

    #[test]
    fn counts_reject_fractions_negatives_and_text() {
        let cases = [
            (Bson::Double(15.5), "not a whole number"),
            (
                Bson::String("7.000000000000001".into()),
                "not a whole number",
            ),
            (
                Bson::String("7.0000000000000000001".into()),
                "not a whole number",
            ),
            (Bson::Int32(-3), "is negative"),
            (Bson::String("-0.0e1".into()), ""),
            (Bson::String("abc".into()), "is not a number"),
            (Bson::String("2,5".into()), "is not a number"),
            (Bson::String("".into()), "is not a number"),
            (Bson::String("NaN".into()), "is not a number"),
            (Bson::String("inf".into()), "is not a number"),
            (Bson::String("0x10".into()), "is not a number"),
            (Bson::Double(f64::NAN), "not a finite number"),
            (Bson::Double(f64::INFINITY), "not a finite number"),
            (decimal("NaN"), "not a finite number"),
            (Bson::Boolean(true), "is not a number"),
            (Bson::Double(1e300), "not a whole number"),
        ];
        for (value, expected) in cases {
            match parse_count(&value) {
                Ok(count) if expected.is_empty() => assert_eq!(count, 0, "{value:?}"),
                Ok(count) => panic!("{value:?} was accepted as {count}"),
                Err(reason) => {
                    assert!(reason.contains(expected), "{value:?}: {reason}");
                    assert!(
                        reason.contains("counts must be whole numbers >= 0"),
                        "{reason}"
                    );
                }
            }
        }
    }

    #[test]
    fn times_accept_fractions_and_reject_negatives() {
        assert_eq!(parse_non_negative(&Bson::String("2.5".into())), Ok(2.5));
        assert_eq!(parse_non_negative(&Bson::Int32(3)), Ok(3.0));
        assert_eq!(parse_non_negative(&decimal("0.25")), Ok(0.25));
        let reason = parse_non_negative(&Bson::Double(-1.5)).expect_err("negative time");
        assert!(reason.contains("-1.5 is negative"), "{reason}");
    }

    #[test]
    fn percent_bounds() {
        assert_eq!(parse_percent(&Bson::Int32(100)), Ok(100.0));
        assert_eq!(parse_percent(&Bson::Int32(0)), Ok(0.0));
        assert!(parse_percent(&Bson::Double(100.5)).is_err());
        assert!(parse_percent(&Bson::Int32(-1)).is_err());
    }

    #[test]
    fn describe_shortens_long_strings() {
        let long = "x".repeat(200);
        assert_eq!(describe(&Bson::String(long)).len(), 62);
    }
}
