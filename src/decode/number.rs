//! Numbers in staging documents. n8n sends int32, double or numeric strings, other producers
//! int64 or decimal128; all are read exactly enough to tell a whole count from a fraction,
//! and NaN, infinities and text that is not a plain decimal number are invalid.

use mongodb::bson::{Bson, Decimal128};

/// Largest integer up to which a double represents every integer exactly (2^53). Counts above
/// it are rejected rather than rounded, which also keeps sums of counts far from i64 overflow.
const MAX_EXACT_INTEGER: i64 = 9_007_199_254_740_992;

/// A finite number read from a staging field.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Number {
    /// The value, with negative zero read as 0 so that no target shows -0.
    pub value: f64,
    pub integer: Integer,
}

/// Classification of a number as an exact integer, an integer beyond 2^53 or a fraction. For
/// decimal128 and strings it is judged from the digits as sent, not from the rounded double.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Integer {
    /// Whole and at most 2^53 in magnitude, so a double represents it exactly.
    Exact(i64),
    /// Whole but beyond 2^53 in magnitude.
    TooLarge,
    /// Not whole.
    Fraction,
}

/// Reads a number of any accepted BSON type.
///
/// # Errors
///
/// A reason fragment such as `"abc" is not a number` for a value of another type, a string
/// that is not a decimal number, NaN, an infinity or a number beyond the range of a double.
pub fn parse(value: &Bson) -> Result<Number, String> {
    let number = match value {
        Bson::Int32(int) => Number::from_integer(i64::from(*int)),
        Bson::Int64(int) => Number::from_integer(*int),
        Bson::Double(double) => from_double(*double)?,
        Bson::Decimal128(decimal) => {
            // A decimal128 that is neither NaN nor an infinity displays as digits, so
            // parse_text fails on it only when it is beyond the range of a double.
            match parse_text(&decimal.to_string()) {
                Ok(number) => number,
                Err(_) if is_nan_or_infinity(decimal) => {
                    return Err(format!("decimal128 {decimal} is not a finite number"))
                }
                Err(_) => {
                    return Err(format!(
                        "decimal128 {decimal} is beyond the range of a double"
                    ))
                }
            }
        }
        Bson::String(text) => parse_text(text)?,
        other => return Err(format!("{} is not a number", describe(other))),
    };

    // -0.0 == 0.0, so this turns negative zero into positive zero and keeps other values.
    let value = if number.value == 0.0 {
        0.0
    } else {
        number.value
    };
    Ok(Number { value, ..number })
}

/// Checks whether a decimal128 is NaN or an infinity, the values that no target stores.
pub fn is_nan_or_infinity(decimal: &Decimal128) -> bool {
    // Display writes NaN as "NaN" or "sNaN" and infinities as "Infinity" or "-Infinity".
    let text = decimal.to_string();
    text.ends_with("NaN") || text.ends_with("Infinity")
}

/// Reads a non-negative whole number, such as a count of cases or survey answers.
///
/// # Errors
///
/// A reason fragment naming the value when it is not a number, not whole, negative or above
/// 2^53.
pub fn parse_count(value: &Bson) -> Result<i64, String> {
    const RULE: &str = "counts must be whole numbers >= 0";
    let number = parse(value).map_err(|reason| format!("{reason}; {RULE}"))?;
    match number.integer {
        Integer::Fraction => Err(format!("{} is not a whole number; {RULE}", describe(value))),
        _ if number.value < 0.0 => Err(format!("{} is negative; {RULE}", describe(value))),
        Integer::TooLarge => Err(format!(
            "{} is too large; counts must be whole numbers from 0 to {MAX_EXACT_INTEGER}",
            describe(value)
        )),
        Integer::Exact(whole) => Ok(whole),
    }
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
        let integer = if int.unsigned_abs() > MAX_EXACT_INTEGER.unsigned_abs() {
            Integer::TooLarge
        } else {
            Integer::Exact(int)
        };
        Number {
            value: int as f64,
            integer,
        }
    }
}

fn from_double(double: f64) -> Result<Number, String> {
    if !double.is_finite() {
        return Err(format!("{double} is not a finite number"));
    }
    let integer = if double.fract() != 0.0 {
        Integer::Fraction
    } else if double.abs() > MAX_EXACT_INTEGER as f64 {
        Integer::TooLarge
    } else {
        Integer::Exact(double as i64)
    };
    Ok(Number {
        value: double,
        integer,
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
        // The digits were checked above, so an infinite result means the decimal overflowed.
        return Err(format!(
            "{:?} is beyond the range of a double",
            truncate(raw)
        ));
    }

    // The value is whole when no non-zero digit is right of the decimal point once the
    // exponent has moved it.
    let digits: Vec<u8> = integer_part.bytes().chain(fraction_part.bytes()).collect();
    let point = integer_part.len() as i64 + exponent;
    let first_fraction_digit = point.clamp(0, digits.len() as i64) as usize;
    let is_whole = digits[first_fraction_digit..]
        .iter()
        .all(|digit| *digit == b'0');
    let integer = if !is_whole {
        Integer::Fraction
    } else if exceeds_max_exact(&digits, point) {
        Integer::TooLarge
    } else {
        // Every whole number up to 2^53 parses to exactly its double, so the cast is exact.
        Integer::Exact(value as i64)
    };
    Ok(Number { value, integer })
}

/// Checks whether a whole number is above 2^53 in magnitude. The number is `digits` with the
/// decimal point after the first `point` of them, padded with zeros when `point` is larger.
/// The check uses the digits because the parsed double rounds: "9007199254740993" parses to
/// 2^53.
fn exceeds_max_exact(digits: &[u8], point: i64) -> bool {
    let integer_digit_count = point.clamp(0, digits.len() as i64) as usize;
    let integer_digits = &digits[..integer_digit_count];
    let leading_zeros = integer_digits
        .iter()
        .take_while(|digit| **digit == b'0')
        .count();
    let significant = &integer_digits[leading_zeros..];
    if significant.is_empty() {
        return false;
    }
    let trailing_zeros = point.saturating_sub(digits.len() as i64).max(0);

    // 2^53 has 16 digits, so any integer with more exceeds it and one with at most 16 fits a
    // u64.
    let max_digits = MAX_EXACT_INTEGER.to_string().len() as i64;
    if significant.len() as i64 + trailing_zeros > max_digits {
        return true;
    }
    let magnitude = significant.iter().fold(0_u64, |magnitude, digit| {
        magnitude * 10 + u64::from(digit - b'0')
    }) * 10_u64.pow(trailing_zeros as u32);
    magnitude > MAX_EXACT_INTEGER.unsigned_abs()
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

    #[test]
    fn counts_beyond_two_pow_53_too_large() {
        let cases = [
            Bson::Double(1e20),
            Bson::Double(1e300),
            Bson::Double(9_007_199_254_740_994.0),
            Bson::String("1e20".into()),
            Bson::String("9007199254740993".into()),
            Bson::String("90071992547409930e-1".into()),
            decimal("1E+20"),
            decimal("9007199254740993"),
            Bson::Int64(9_007_199_254_740_993),
            Bson::Int64(i64::MAX),
        ];
        for value in cases {
            let reason = parse_count(&value).expect_err("count beyond 2^53");
            assert!(
                reason.contains(
                    " is too large; counts must be whole numbers from 0 to 9007199254740992"
                ),
                "{value:?}: {reason}"
            );
        }
    }

    #[test]
    fn counts_up_to_two_pow_53_accepted() {
        let cases = [
            Bson::Double(9_007_199_254_740_992.0),
            Bson::String("9007199254740992".into()),
            Bson::String("9.007199254740992e15".into()),
            decimal("9007199254740992"),
            Bson::Int64(9_007_199_254_740_992),
        ];
        for value in cases {
            assert_eq!(parse_count(&value), Ok(9_007_199_254_740_992), "{value:?}");
        }
        let reason = parse_count(&Bson::Double(-1e20)).expect_err("negative count");
        assert!(
            reason.contains("-100000000000000000000 is negative"),
            "{reason}"
        );
    }

    #[test]
    fn numbers_beyond_double_range_named() {
        let cases = [
            (
                Bson::String("1e400".into()),
                "\"1e400\" is beyond the range of a double",
            ),
            (
                Bson::String("-1e400".into()),
                "\"-1e400\" is beyond the range of a double",
            ),
            (
                decimal("1E+400"),
                "decimal128 1E+400 is beyond the range of a double",
            ),
        ];
        for (value, expected) in cases {
            let reason = parse_count(&value).expect_err("count beyond the range of a double");
            assert!(reason.contains(expected), "{value:?}: {reason}");
            let reason = parse_non_negative(&value).expect_err("time beyond the range of a double");
            assert!(reason.contains(expected), "{value:?}: {reason}");
        }
        let reason = parse(&decimal("-Infinity")).expect_err("decimal128 infinity");
        assert_eq!(reason, "decimal128 -Infinity is not a finite number");
    }

    #[test]
    fn negative_zero_read_as_zero() {
        let cases = [
            Bson::Double(-0.0),
            Bson::String("-0".into()),
            Bson::String("-0.0e1".into()),
            decimal("-0"),
        ];
        for value in cases {
            let time = parse_non_negative(&value).expect("zero is a valid time");
            assert_eq!(
                time.to_bits(),
                0.0_f64.to_bits(),
                "{value:?} read as {time}"
            );
            let percent = parse_percent(&value).expect("zero is a valid percentage");
            assert_eq!(
                percent.to_bits(),
                0.0_f64.to_bits(),
                "{value:?} read as {percent}"
            );
        }
    }
}
