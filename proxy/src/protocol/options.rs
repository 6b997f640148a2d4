//! The `options` startup parameter (`-c name=value`, `--name=value`): what libpq's `options`
//! connection setting and `PGOPTIONS` send. Read here, in the protocol layer, because both the
//! login (`client::params`) and the guard (`Guard::check_startup_options`) need it.

/// `-c name=value` and `--name=value` pairs of the `options` startup parameter (dashes in names
/// read as underscores, as Postgres does).
pub fn option_pairs(options: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut words = options.split_whitespace();
    while let Some(w) = words.next() {
        let kv = if w == "-c" {
            words.next().unwrap_or("")
        } else if let Some(rest) = w.strip_prefix("-c").or_else(|| w.strip_prefix("--")) {
            rest
        } else {
            continue;
        };
        if let Some((k, v)) = kv.split_once('=') {
            out.push((k.replace('-', "_"), v.to_string()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::option_pairs;

    #[test]
    fn reads_both_spellings() {
        let pairs = option_pairs("-c statement_timeout=1234 --app.theme=dark -cTimeZone=UTC -x --work-mem=4MB -c");
        let pairs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(pairs, [("statement_timeout", "1234"), ("app.theme", "dark"), ("TimeZone", "UTC"), ("work_mem", "4MB")]);
    }
}
