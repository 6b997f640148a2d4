//! Settings that would make the server read SQL differently from pgtenant's lexer.
//!
//! The guard tokenizes SQL assuming `standard_conforming_strings = on` (a backslash is an
//! ordinary character in `'...'`) and a client encoding in which the bytes of `\` and `'` are
//! always those characters. A client that turns `standard_conforming_strings` off, or switches to
//! an encoding whose multi-byte characters may contain those bytes (Postgres's client-only
//! encodings: BIG5, GBK, GB18030, JOHAB, SJIS, SHIFT_JIS_2004, UHC), could hide a statement inside
//! what pgtenant reads as a string literal. Those values are refused wherever a setting can be
//! changed: startup parameters and `options`, `SET`, `SET NAMES`, `set_config`, and `SET` clauses.

use crate::error::PgError;

/// Encodings (Postgres's normalized names and aliases) whose characters may contain `\` or `'`.
const UNSAFE_ENCODINGS: &[&str] = &[
    "big5", "win950", "cp950", "gbk", "win936", "cp936", "gb18030", "johab", "sjis", "shiftjis", "mskanji", "win932",
    "cp932", "shiftjis2004", "uhc", "win949", "cp949",
];

/// Postgres compares encoding names without case and without non-alphanumeric characters.
fn normalized(value: &str) -> String {
    value.chars().filter(|c| c.is_ascii_alphanumeric()).map(|c| c.to_ascii_lowercase()).collect()
}

/// Whether this setting's value matters to the lexer (so a value that cannot be read is refused).
pub fn is_lexer_setting(name: &str) -> bool {
    matches!(name.to_lowercase().as_str(), "standard_conforming_strings" | "client_encoding" | "names")
}

/// Refuses `name = value` when it would change how the server tokenizes SQL. `value` is `None`
/// when it could not be read (not a plain literal): refused for the settings that matter.
pub fn check(name: &str, value: Option<&str>) -> Result<(), PgError> {
    if !is_lexer_setting(name) {
        return Ok(());
    }
    let Some(value) = value else {
        return Err(refusal(name, "a value that is not a plain literal"));
    };
    let v = normalized(value);
    let bad = match name.to_lowercase().as_str() {
        "standard_conforming_strings" => !matches!(v.as_str(), "on" | "true" | "yes" | "1" | "t" | "y" | "default"),
        _ => UNSAFE_ENCODINGS.contains(&v.as_str()),
    };
    if bad {
        return Err(refusal(name, &format!("'{value}'")));
    }
    Ok(())
}

fn refusal(name: &str, what: &str) -> PgError {
    let setting = if name.eq_ignore_ascii_case("names") { "client_encoding" } else { name };
    PgError::error(
        crate::error::sqlstate::INSUFFICIENT_PRIVILEGE,
        format!("pgtenant: setting {setting} to {what} is not allowed: it would change how SQL is read, and the statement guard relies on that"),
    )
    .with_hint("use standard_conforming_strings = on and an ASCII-safe client encoding such as UTF8")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values() {
        assert!(check("standard_conforming_strings", Some("off")).is_err());
        assert!(check("Standard_Conforming_Strings", Some("false")).is_err());
        assert!(check("standard_conforming_strings", Some("0")).is_err());
        assert!(check("standard_conforming_strings", None).is_err());
        assert!(check("standard_conforming_strings", Some("on")).is_ok());
        assert!(check("standard_conforming_strings", Some("DEFAULT")).is_ok());
        for enc in ["SJIS", "Shift_JIS", "shift-jis-2004", "BIG5", "gbk", "GB18030", "johab", "UHC", "WIN932", "cp949"] {
            assert!(check("client_encoding", Some(enc)).is_err(), "{enc}");
            assert!(check("names", Some(enc)).is_err(), "{enc}");
        }
        for enc in ["UTF8", "utf-8", "LATIN1", "SQL_ASCII", "EUC_JP", "WIN1252", "default"] {
            assert!(check("client_encoding", Some(enc)).is_ok(), "{enc}");
        }
        assert!(check("application_name", None).is_ok());
        assert_eq!(check("client_encoding", Some("sjis")).unwrap_err().code, "42501");
    }
}
