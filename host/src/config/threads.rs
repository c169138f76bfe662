//! The process's thread counts from the environment (`TASKHOST_IO_THREADS`,
//! `TASKHOST_GUEST_THREADS`), checked the same way: a value that is not a count the variable
//! allows is reported and the default used, never silently taken or ignored.

/// The count `var` sets, at least `least`; one per core when unset or not such a count (with a
/// warning saying so).
pub fn from_env(var: &str, least: usize) -> usize {
    let default = std::thread::available_parallelism().map_or(1, |n| n.get());
    let Ok(value) = std::env::var(var) else {
        return default;
    };
    parse(&value, least).unwrap_or_else(|| {
        tracing::warn!(
            "{var}={value:?} is not a number of threads ({least} or more): using {default}"
        );
        default
    })
}

fn parse(value: &str, least: usize) -> Option<usize> {
    value.trim().parse::<usize>().ok().filter(|&n| n >= least)
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn a_count_below_the_least_the_variable_allows_is_refused() {
        assert_eq!(parse("0", 1), None);
        assert_eq!(parse("0", 0), Some(0));
    }

    #[test]
    fn a_value_that_is_not_a_count_is_refused() {
        for bad in ["", "two", "-1", "1.5"] {
            assert_eq!(parse(bad, 0), None, "{bad:?}");
        }
        assert_eq!(parse(" 3 ", 1), Some(3));
    }
}
