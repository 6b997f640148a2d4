//! The console's command language: PgBouncer's words, case-insensitive, several per query separated
//! by `;`. A tenant id is a bare word or a quoted string (`'…'` or `"…"`, the quote doubled inside).

use crate::error::{sqlstate, PgError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Show(Show),
    Reload,
    Pause,
    Resume,
    Kill(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Show {
    Pools,
    Clients,
    Servers,
    Tenants,
    Stats,
    Config,
    Version,
}

const COMMANDS: &str =
    "SHOW POOLS | CLIENTS | SERVERS | TENANTS | STATS | CONFIG | VERSION, RELOAD, PAUSE, RESUME, KILL <tenant>";

fn syntax(message: String) -> PgError {
    PgError::error(sqlstate::SYNTAX_ERROR, message).with_hint(format!("the pgtenant console knows: {COMMANDS}"))
}

/// The commands of one simple Query, in order (none for an empty query).
pub fn parse(text: &str) -> Result<Vec<Command>, PgError> {
    let mut commands = Vec::new();
    for words in statements(text)? {
        if !words.is_empty() {
            commands.push(command(&words)?);
        }
    }
    Ok(commands)
}

/// A word, and whether it was quoted (a quoted word is never a keyword).
type Word = (String, bool);

fn command(words: &[Word]) -> Result<Command, PgError> {
    let keyword = |i: usize| words.get(i).filter(|(_, quoted)| !quoted).map(|(w, _)| w.to_ascii_uppercase());
    let all = words.iter().map(|(w, _)| w.as_str()).collect::<Vec<_>>().join(" ");
    let unknown = || syntax(format!("pgtenant console: unknown command \"{all}\""));
    let (cmd, arity) = match keyword(0).as_deref() {
        Some("SHOW") => {
            let what = match keyword(1).as_deref() {
                Some("POOLS") => Show::Pools,
                Some("CLIENTS") => Show::Clients,
                Some("SERVERS") => Show::Servers,
                Some("TENANTS") => Show::Tenants,
                Some("STATS") => Show::Stats,
                Some("CONFIG") => Show::Config,
                Some("VERSION") => Show::Version,
                _ => return Err(unknown()),
            };
            (Command::Show(what), 2)
        }
        Some("RELOAD") => (Command::Reload, 1),
        Some("PAUSE") => (Command::Pause, 1),
        Some("RESUME") => (Command::Resume, 1),
        Some("KILL") => match words.get(1) {
            Some((tenant, _)) => (Command::Kill(tenant.clone()), 2),
            None => return Err(syntax("pgtenant console: KILL needs a tenant id (KILL <tenant>)".into())),
        },
        _ => return Err(unknown()),
    };
    if words.len() > arity {
        return Err(syntax(format!("pgtenant console: unexpected \"{}\" after {}", words[arity].0, words[..arity].iter().map(|(w, _)| w.as_str()).collect::<Vec<_>>().join(" "))));
    }
    Ok(cmd)
}

/// Splits the query into statements of words.
fn statements(text: &str) -> Result<Vec<Vec<Word>>, PgError> {
    let mut out = vec![Vec::new()];
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ';' => out.push(Vec::new()),
            c if c.is_whitespace() => {}
            '\'' | '"' => {
                let mut word = String::new();
                loop {
                    match chars.next() {
                        Some(q) if q == c && chars.peek() == Some(&c) => {
                            chars.next();
                            word.push(c);
                        }
                        Some(q) if q == c => break,
                        Some(other) => word.push(other),
                        None => return Err(syntax("pgtenant console: unterminated quoted string".into())),
                    }
                }
                out.last_mut().expect("never empty").push((word, true));
            }
            c => {
                let mut word = String::from(c);
                while let Some(&n) = chars.peek() {
                    if n.is_whitespace() || n == ';' || n == '\'' || n == '"' {
                        break;
                    }
                    word.push(n);
                    chars.next();
                }
                out.last_mut().expect("never empty").push((word, false));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_case_insensitively_and_in_sequence() {
        assert_eq!(parse("show pools").unwrap(), [Command::Show(Show::Pools)]);
        assert_eq!(
            parse(" SHOW Clients ; pause;RESUME; reload ;").unwrap(),
            [Command::Show(Show::Clients), Command::Pause, Command::Resume, Command::Reload]
        );
        assert_eq!(parse("KILL 42").unwrap(), [Command::Kill("42".into())]);
        assert_eq!(parse("kill 'it''s; a \"tenant\"'").unwrap(), [Command::Kill("it's; a \"tenant\"".into())]);
        assert_eq!(parse("KILL \"pools\"").unwrap(), [Command::Kill("pools".into())]);
        assert!(parse("  ;; ").unwrap().is_empty());
    }

    #[test]
    fn unknown_or_malformed_commands_are_syntax_errors() {
        for bad in ["SELECT 1", "SHOW", "SHOW 'pools'", "SHOW LISTS", "KILL", "PAUSE app", "KILL 'open", "show pools extra"] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.code, sqlstate::SYNTAX_ERROR, "{bad}");
            assert!(e.hint.is_some_and(|h| h.contains("SHOW POOLS")), "{bad}");
        }
    }
}
