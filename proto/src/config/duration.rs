//! Durations in the config: an integer number of seconds, or a string such as `"500ms"`,
//! `"30s"`, `"5m"`, `"1h"`, `"7d"`, or a sum of those (`"1m30s"`).

use std::time::Duration;

/// Parses a duration string; the error says what is accepted.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || {
        format!("invalid duration {text:?}; use seconds (300) or a string like \"500ms\", \"30s\", \"5m\", \"1h\", \"7d\"")
    };
    let text_trimmed = text.trim();
    if text_trimmed.is_empty() {
        return Err(bad());
    }
    if let Ok(secs) = text_trimmed.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total = Duration::ZERO;
    let mut rest = text_trimmed;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad());
        }
        let value: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let part = match unit {
            "ms" => Duration::from_millis(value),
            "s" => Duration::from_secs(value),
            "m" => Duration::from_secs(value.checked_mul(60).ok_or_else(bad)?),
            "h" => Duration::from_secs(value.checked_mul(3600).ok_or_else(bad)?),
            "d" => Duration::from_secs(value.checked_mul(86_400).ok_or_else(bad)?),
            _ => return Err(bad()),
        };
        total = total.checked_add(part).ok_or_else(bad)?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_seconds_and_units() {
        let cases = [
            ("300", 300_000),
            ("500ms", 500),
            ("30s", 30_000),
            ("5m", 300_000),
            ("1h", 3_600_000),
            ("1m30s", 90_000),
            ("2d", 172_800_000),
            ("0", 0),
        ];
        for (text, ms) in cases {
            assert_eq!(
                parse_duration(text),
                Ok(Duration::from_millis(ms)),
                "{text}"
            );
        }
    }

    #[test]
    fn refuses_garbage() {
        for text in [
            "",
            "5 minutes",
            "-1",
            "1.5s",
            "s",
            "5w",
            "1m30",
            "ms5",
            "99999999999999999999h",
        ] {
            assert!(parse_duration(text).is_err(), "{text:?} should be refused");
        }
    }
}
