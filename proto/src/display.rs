//! How durations and dates read to a person, shared by tenctl and the proxy's dashboard:
//! pure functions, no I/O, no clock.

/// Seconds as a short human duration: `0s`, `42s`, `5m12s`, `2h3m`, `3d4h`. Only the two
/// largest units are shown; a zero second unit is left out (`5m`, `2h`, `3d`).
pub fn human_duration(secs: u64) -> String {
    const MINUTE: u64 = 60;
    const HOUR: u64 = 60 * MINUTE;
    const DAY: u64 = 24 * HOUR;
    let (big, big_unit, small, small_unit) = if secs < MINUTE {
        return format!("{secs}s");
    } else if secs < HOUR {
        (secs / MINUTE, "m", secs % MINUTE, "s")
    } else if secs < DAY {
        (secs / HOUR, "h", (secs % HOUR) / MINUTE, "m")
    } else {
        (secs / DAY, "d", (secs % DAY) / HOUR, "h")
    };
    if small == 0 {
        format!("{big}{big_unit}")
    } else {
        format!("{big}{big_unit}{small}{small_unit}")
    }
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day).
///
/// Howard Hinnant's `civil_from_days` (<https://howardhinnant.github.io/date_algorithms.html>):
/// shift the epoch to 0000-03-01 so the leap day ends each 400-year era, then peel off eras,
/// years and months arithmetically. No tables, no loops, exact for every i64 day count whose
/// result fits.
pub fn days_to_civil(days: i64) -> (i64, u32, u32) {
    let z = days.saturating_add(719_468);
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // day of era, [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // day of year from March 1st, [0, 365]
    let mp = (5 * doy + 2) / 153; // month from March, [0, 11]
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    // Both are small and positive by construction.
    (year, month as u32, day as u32)
}

/// The fleet's hosts as a table, one line a host (`tenement-fleet hosts`, `tenctl hosts`).
pub fn fleet_hosts(views: &[crate::rpc::FleetHost]) -> String {
    let gib = |bytes: u64| format!("{:.1}", bytes as f64 / f64::from(1u32 << 30));
    let mut rows = vec![[
        "HOST".to_owned(),
        "STATE".to_owned(),
        "ADDRESS".to_owned(),
        "PLACED".to_owned(),
        "RUNNING".to_owned(),
        "MEMORY FREE (GiB)".to_owned(),
        "HEARTBEAT".to_owned(),
    ]];
    for v in views {
        let mut state = match (v.live, v.controller) {
            (true, true) => "live, controller",
            (true, false) => "live",
            (false, _) => "gone",
        }
        .to_owned();
        if v.drained {
            state.push_str(", drained");
        }
        let placed = match v.max_tenants {
            Some(cap) => format!("{}/{cap}", v.placed),
            None => v.placed.to_string(),
        };
        let memory = match (v.memory_available, v.memory_total) {
            (Some(free), Some(total)) => format!("{} of {}", gib(free), gib(total)),
            _ => "-".to_owned(),
        };
        rows.push([
            v.host.clone(),
            state,
            v.address.map_or_else(|| "-".to_owned(), |a| a.to_string()),
            placed,
            v.running.map_or_else(|| "-".to_owned(), |r| r.to_string()),
            memory,
            v.heartbeat_age_ms.map_or_else(
                || "-".to_owned(),
                |ms| format!("{:.1} s ago", ms as f64 / 1000.0),
            ),
        ]);
    }
    let widths: Vec<usize> = (0..7)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut text = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:width$}"))
            .collect();
        text.push_str(line.join("  ").trim_end());
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_show_the_two_largest_units() {
        let cases = [
            (0, "0s"),
            (3, "3s"),
            (59, "59s"),
            (60, "1m"),
            (312, "5m12s"),
            (3599, "59m59s"),
            (3600, "1h"),
            (7380, "2h3m"),
            (7399, "2h3m"),
            (86_399, "23h59m"),
            (86_400, "1d"),
            (3 * 86_400 + 4 * 3600 + 59, "3d4h"),
            (u64::MAX, "213503982334601d7h"),
        ];
        for (secs, text) in cases {
            assert_eq!(human_duration(secs), text, "{secs}");
        }
    }

    #[test]
    fn days_to_civil_matches_known_dates() {
        assert_eq!(days_to_civil(0), (1970, 1, 1));
        assert_eq!(days_to_civil(-1), (1969, 12, 31));
        assert_eq!(days_to_civil(59), (1970, 3, 1));
        assert_eq!(days_to_civil(11_016), (2000, 2, 29));
        assert_eq!(days_to_civil(19_675), (2023, 11, 14));
        assert_eq!(days_to_civil(-719_468), (0, 3, 1));
        // Every day of 1968-2100 follows the previous one.
        let mut previous = days_to_civil(-730);
        for days in -729..47_482 {
            let (y, m, d) = days_to_civil(days);
            let (py, pm, pd) = previous;
            let next_day = y == py && m == pm && d == pd + 1;
            let next_month = y == py && m == pm + 1 && d == 1;
            let next_year = y == py + 1 && m == 1 && d == 1 && pm == 12 && pd == 31;
            assert!(
                next_day || next_month || next_year,
                "{previous:?} -> {y}-{m}-{d}"
            );
            previous = (y, m, d);
        }
    }
}
