//! Colour: whether to use it (one decision, as no-color.org and the CLICOLOR convention say)
//! and the styles the CLI paints with (`anstyle`, no hand-written escape codes).

use anstyle::{AnsiColor, Style};

/// Whether output to a stream colours: `--color always|never` wins; else `CLICOLOR_FORCE`
/// (non-empty, not `0`) forces it, a non-empty `NO_COLOR` turns it off, and otherwise only a
/// terminal that supports colour (not `TERM=dumb`, not `CLICOLOR=0`) gets it.
pub fn enabled(is_terminal: bool, forced: Option<bool>) -> bool {
    if let Some(forced) = forced {
        return forced;
    }
    if anstyle_query::clicolor_force() {
        return true;
    }
    if anstyle_query::no_color() {
        return false;
    }
    is_terminal && anstyle_query::term_supports_color() && anstyle_query::clicolor() != Some(false)
}

pub const DIM: Style = Style::new().dimmed();
pub const GREEN: Style = AnsiColor::Green.on_default();
pub const RED: Style = AnsiColor::Red.on_default();
pub const YELLOW: Style = AnsiColor::Yellow.on_default();
pub const CYAN: Style = AnsiColor::Cyan.on_default();
pub const MAGENTA: Style = AnsiColor::Magenta.on_default();

/// `text` in `style`, or as it is when `color` is off.
pub fn paint(color: bool, style: Style, text: &str) -> String {
    if color {
        format!("{style}{text}{style:#}")
    } else {
        text.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forcing_wins_and_painting_off_leaves_the_text_alone() {
        assert!(enabled(false, Some(true)));
        assert!(!enabled(true, Some(false)));
        assert_eq!(paint(false, RED, "x"), "x");
        assert_eq!(paint(true, RED, "x"), "\u{1b}[31mx\u{1b}[0m");
        assert_eq!(paint(true, DIM, "x"), "\u{1b}[2mx\u{1b}[0m");
    }
}
