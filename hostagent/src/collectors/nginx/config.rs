//! nginx's config syntax, read the way nginx reads it (`ngx_conf_file.c`): tokens, quoted
//! strings, comments, blocks and `include` (globs too). A file nginx would refuse is an error
//! naming the file and line; nothing in it can panic.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::canonical;

/// Includes nested deeper than this are a cycle in all but name.
const MAX_INCLUDE_DEPTH: usize = 32;
/// Blocks nested deeper than this are refused, so that hostile input cannot exhaust the stack
/// of the recursive parser (real configs nest a handful of levels).
const MAX_BLOCK_DEPTH: usize = 64;

/// A config nginx's syntax does not allow, or files that could not be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NginxConfigError {
    /// Bad syntax, or an `include` that fails, at a file and line.
    #[error("{}:{line}: {message}", file.display())]
    Syntax {
        /// The file.
        file: PathBuf,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// The main config file could not be read.
    #[error("cannot read {}: {message}", file.display())]
    Read {
        /// The file.
        file: PathBuf,
        /// The I/O error.
        message: String,
    },
}

/// One directive, with the block it opens (`server { ... }`) if any.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Directive {
    pub(super) name: String,
    pub(super) args: Vec<String>,
    pub(super) block: Option<Vec<Directive>>,
    /// Where it is written, for `NginxServer::source`.
    pub(super) file: Arc<Path>,
    pub(super) line: usize,
}

impl Directive {
    pub(super) fn children(&self) -> &[Directive] {
        self.block.as_deref().unwrap_or_default()
    }

    pub(super) fn arg(&self, i: usize) -> Option<&str> {
        self.args.get(i).map(String::as_str)
    }
}

/// A tokenized file: each token with its line, and the number of the last line.
pub(super) struct Lexed {
    pub(super) tokens: Vec<(Token, usize)>,
    pub(super) last_line: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Token {
    Word(String),
    Semicolon,
    Open,
    Close,
}

/// Splits a config file into tokens with their lines, by `ngx_conf_read_token`'s rules:
/// `#` starts a comment only where a token could start; quoted strings take `\"`, `\'`, `\\`,
/// `\t`, `\r` and `\n` escapes and must be followed by a separator; in bare words a backslash
/// protects the next character and `${` does not open a block. Returns the tokens and the
/// number of the last line (for "unexpected end of file"), or the line and reason of a lexical
/// error.
pub(super) fn tokenize(text: &str) -> Result<Lexed, (usize, String)> {
    let mut tokens = Vec::new();
    let mut chars = text.chars().peekable();
    let mut line = 1;
    while let Some(c) = chars.next() {
        match c {
            '\n' => line += 1,
            ' ' | '\t' | '\r' => {}
            '#' => while chars.next_if(|&c| c != '\n').is_some() {},
            ';' => tokens.push((Token::Semicolon, line)),
            '{' => tokens.push((Token::Open, line)),
            '}' => tokens.push((Token::Close, line)),
            '"' | '\'' => {
                let start = line;
                let mut word = String::new();
                loop {
                    match chars.next() {
                        None => return Err((start, format!("unterminated string (missing {c})"))),
                        Some('\\') => match chars.next() {
                            Some(escaped) => unescape(escaped, &mut word, &mut line),
                            None => {
                                return Err((start, format!("unterminated string (missing {c})")))
                            }
                        },
                        Some(q) if q == c => break,
                        Some(other) => {
                            if other == '\n' {
                                line += 1;
                            }
                            word.push(other);
                        }
                    }
                }
                match chars.peek() {
                    None | Some(' ' | '\t' | '\r' | '\n' | ';' | '{') => {}
                    Some(other) => {
                        return Err((
                            line,
                            format!("unexpected \"{other}\" after a quoted string"),
                        ))
                    }
                }
                tokens.push((Token::Word(word), start));
            }
            first => {
                let start = line;
                let mut word = String::new();
                let mut current = first;
                loop {
                    if current == '\\' {
                        match chars.next() {
                            Some(escaped) => unescape(escaped, &mut word, &mut line),
                            None => word.push('\\'),
                        }
                    } else {
                        word.push(current);
                    }
                    // `${name}` is a variable, not a block.
                    let variable = current == '$';
                    match chars.next_if(|&c| {
                        !matches!(c, ' ' | '\t' | '\r' | '\n' | ';') && (c != '{' || variable)
                    }) {
                        Some(next) => current = next,
                        None => break,
                    }
                }
                tokens.push((Token::Word(word), start));
            }
        }
    }
    Ok(Lexed {
        tokens,
        last_line: line,
    })
}

/// Appends the character a backslash escape stands for, as nginx does.
pub(super) fn unescape(escaped: char, word: &mut String, line: &mut usize) {
    match escaped {
        '"' | '\'' | '\\' => word.push(escaped),
        't' => word.push('\t'),
        'r' => word.push('\r'),
        'n' => word.push('\n'),
        other => {
            // Anything else keeps its backslash: regexes such as `\.php$` rely on it.
            if other == '\n' {
                *line += 1;
            }
            word.push('\\');
            word.push(other);
        }
    }
}

/// Reads a main config file and everything it includes into one tree.
pub(super) struct Parser {
    /// Where relative `include` paths start: the main file's directory (nginx's conf prefix).
    pub(super) conf_dir: PathBuf,
    /// The files being parsed, outermost first, to refuse include cycles.
    pub(super) stack: Vec<PathBuf>,
}

impl Parser {
    pub(super) fn parse_main(path: &Path) -> Result<Vec<Directive>, NginxConfigError> {
        let text = std::fs::read(path).map_err(|e| NginxConfigError::Read {
            file: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let mut parser = Parser {
            conf_dir: path.parent().map(Path::to_path_buf).unwrap_or_default(),
            stack: vec![canonical(path)],
        };
        parser.parse_text(path, &String::from_utf8_lossy(&text))
    }

    pub(super) fn parse_text(
        &mut self,
        path: &Path,
        text: &str,
    ) -> Result<Vec<Directive>, NginxConfigError> {
        let file: Arc<Path> = Arc::from(path);
        let Lexed { tokens, last_line } =
            tokenize(text).map_err(|(line, message)| syntax(&file, line, message))?;
        let mut pos = 0;
        self.block(&tokens, &mut pos, &file, last_line, None, 0)
    }

    /// Parses directives up to the `}` that closes the block opened on line `opened` (or to
    /// the end of the file when `opened` is `None`).
    pub(super) fn block(
        &mut self,
        tokens: &[(Token, usize)],
        pos: &mut usize,
        file: &Arc<Path>,
        last_line: usize,
        opened: Option<usize>,
        depth: usize,
    ) -> Result<Vec<Directive>, NginxConfigError> {
        let mut out = Vec::new();
        let mut words: Vec<String> = Vec::new();
        let mut first_line = 0;
        loop {
            let Some((token, line)) = tokens.get(*pos) else {
                if !words.is_empty() {
                    return Err(syntax(
                        file,
                        last_line,
                        format!(
                            "unexpected end of file, expecting \";\" or \"}}\" after \"{}\"",
                            words[0]
                        ),
                    ));
                }
                if let Some(opened) = opened {
                    return Err(syntax(
                        file,
                        last_line,
                        format!(
                            "unexpected end of file, expecting \"}}\" to close the block opened on line {opened}"
                        ),
                    ));
                }
                return Ok(out);
            };
            let line = *line;
            *pos += 1;
            match token {
                Token::Word(word) => {
                    if words.is_empty() {
                        first_line = line;
                    }
                    words.push(word.clone());
                }
                Token::Semicolon => {
                    let Some((name, args)) = split_first(std::mem::take(&mut words)) else {
                        return Err(syntax(file, line, "unexpected \";\"".into()));
                    };
                    if name == "include" {
                        let included = self.include(&args, file, first_line)?;
                        out.extend(included);
                    } else {
                        out.push(Directive {
                            name,
                            args,
                            block: None,
                            file: file.clone(),
                            line: first_line,
                        });
                    }
                }
                Token::Open => {
                    let Some((name, args)) = split_first(std::mem::take(&mut words)) else {
                        return Err(syntax(file, line, "unexpected \"{\"".into()));
                    };
                    if depth >= MAX_BLOCK_DEPTH {
                        return Err(syntax(
                            file,
                            line,
                            format!("blocks nested deeper than {MAX_BLOCK_DEPTH} levels"),
                        ));
                    }
                    let block = self.block(tokens, pos, file, last_line, Some(line), depth + 1)?;
                    out.push(Directive {
                        name,
                        args,
                        block: Some(block),
                        file: file.clone(),
                        line: first_line,
                    });
                }
                Token::Close => {
                    if let Some(name) = words.first() {
                        return Err(syntax(
                            file,
                            line,
                            format!("unexpected \"}}\": \"{name}\" is missing its \";\""),
                        ));
                    }
                    if opened.is_none() {
                        return Err(syntax(file, line, "unexpected \"}\"".into()));
                    }
                    return Ok(out);
                }
            }
        }
    }

    /// Expands `include PATTERN;` into the directives of the files it names, in the order
    /// nginx reads them (glob matches sorted, no match being no error).
    pub(super) fn include(
        &mut self,
        args: &[String],
        file: &Arc<Path>,
        line: usize,
    ) -> Result<Vec<Directive>, NginxConfigError> {
        let [pattern] = args else {
            return Err(syntax(
                file,
                line,
                format!("\"include\" takes one argument, not {}", args.len()),
            ));
        };
        let path = self.conf_dir.join(pattern);
        let files = if pattern.contains(['*', '?', '[']) {
            let options = glob::MatchOptions {
                case_sensitive: true,
                require_literal_separator: true,
                // Like glob(3), which nginx uses: `*` does not match dot files.
                require_literal_leading_dot: true,
            };
            let matches = glob::glob_with(&path.to_string_lossy(), options).map_err(|e| {
                syntax(
                    file,
                    line,
                    format!("bad include pattern \"{pattern}\": {e}"),
                )
            })?;
            // Unreadable directories are skipped, as glob(3) without GLOB_ERR does.
            matches.flatten().collect()
        } else {
            vec![path]
        };
        if self.stack.len() > MAX_INCLUDE_DEPTH {
            return Err(syntax(
                file,
                line,
                format!("includes nested deeper than {MAX_INCLUDE_DEPTH} levels"),
            ));
        }
        let mut out = Vec::new();
        for included in files {
            let key = canonical(&included);
            if self.stack.contains(&key) {
                return Err(syntax(
                    file,
                    line,
                    format!("include cycle: {} includes itself", included.display()),
                ));
            }
            let text = std::fs::read(&included).map_err(|e| {
                syntax(
                    file,
                    line,
                    format!(
                        "include \"{pattern}\": cannot read {}: {e}",
                        included.display()
                    ),
                )
            })?;
            self.stack.push(key);
            let parsed = self.parse_text(&included, &String::from_utf8_lossy(&text));
            self.stack.pop();
            out.extend(parsed?);
        }
        Ok(out)
    }
}

pub(super) fn split_first(mut words: Vec<String>) -> Option<(String, Vec<String>)> {
    if words.is_empty() {
        return None;
    }
    let name = words.remove(0);
    Some((name, words))
}

pub(super) fn syntax(file: &Arc<Path>, line: usize, message: String) -> NginxConfigError {
    NginxConfigError::Syntax {
        file: file.to_path_buf(),
        line,
        message,
    }
}

// ---------------------------------------------------------------------------------------------
// The config: what it serves.

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(crate) fn parse(text: &str) -> Result<Vec<Directive>, NginxConfigError> {
        let mut parser = Parser {
            conf_dir: PathBuf::from("/nonexistent"),
            stack: Vec::new(),
        };
        parser.parse_text(Path::new("test.conf"), text)
    }

    pub(super) fn names(ds: &[Directive]) -> Vec<&str> {
        ds.iter().map(|d| d.name.as_str()).collect()
    }

    pub(super) fn error_at(text: &str) -> (usize, String) {
        match parse(text) {
            Err(NginxConfigError::Syntax { line, message, .. }) => (line, message),
            other => panic!("expected a syntax error for {text:?}, got {other:?}"),
        }
    }

    #[test]
    pub(super) fn tokens_quotes_comments_and_escapes_follow_nginx() {
        let tree = parse(
            "# leading comment\n\
             user nobody; # trailing\n\
             log_format main '$remote_addr \"$request\"' \"a\\tb\";\n\
             location ~ \\.php$ { return 200 \"${host}x\"; }\n\
             set $a ${b}c;\n\
             add_header X-Hash a#b;\n",
        )
        .unwrap();
        assert_eq!(
            names(&tree),
            ["user", "log_format", "location", "set", "add_header"]
        );
        assert_eq!(tree[1].args, ["main", "$remote_addr \"$request\"", "a\tb"]);
        assert_eq!(tree[2].args, ["~", "\\.php$"]);
        assert_eq!(tree[2].children()[0].args, ["200", "${host}x"]);
        assert_eq!(tree[3].args, ["$a", "${b}c"]);
        assert_eq!(tree[4].args, ["X-Hash", "a#b"]);
        assert_eq!(tree[2].line, 4);
    }

    #[test]
    pub(super) fn blocks_nest_and_lines_count_across_multiline_strings() {
        let tree = parse("http {\n  server {\n    listen 80;\n  }\n}\nx 'a\nb';\ny;").unwrap();
        let server = &tree[0].children()[0];
        assert_eq!(server.line, 2);
        assert_eq!(server.children()[0].line, 3);
        assert_eq!(tree[1].args, ["a\nb"]);
        assert_eq!(tree[2].line, 8);
    }

    #[test]
    pub(super) fn bad_syntax_names_the_line() {
        assert_eq!(error_at("a;\nb {\n c;\n").0, 4);
        assert!(error_at("a;\nb {\n c;\n").1.contains("opened on line 2"));
        assert_eq!(error_at("a;\n}\n"), (2, "unexpected \"}\"".into()));
        assert_eq!(error_at("a;\n;\n").0, 2);
        assert_eq!(error_at("a;\n{ b; }").0, 2);
        assert!(error_at("server {\n listen 80\n}")
            .1
            .contains("\"listen\" is missing"));
        assert!(error_at("a b").1.contains("unexpected end of file"));
        assert_eq!(error_at("a;\nb \"open;\n\n").0, 2);
        assert!(error_at("a \"x\"y;").1.contains("after a quoted string"));
        assert_eq!(error_at("a \\").0, 1);
        let deep = "a {".repeat(MAX_BLOCK_DEPTH + 1) + &"}".repeat(MAX_BLOCK_DEPTH + 1);
        assert!(error_at(&deep).1.contains("nested deeper"));
    }

    #[test]
    pub(super) fn arbitrary_bytes_never_panic() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let alphabet = b"ab{};#'\"\\$ \n\t\r\xff";
        for _ in 0..5000 {
            let len = rng.gen_range(0..40);
            let bytes: Vec<u8> = (0..len)
                .map(|_| alphabet[rng.gen_range(0..alphabet.len())])
                .collect();
            let _ = parse(&String::from_utf8_lossy(&bytes));
        }
    }

    #[test]
    pub(super) fn includes_follow_globs_relative_to_the_main_file_and_refuse_cycles() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("sites")).unwrap();
        std::fs::write(
            d.join("nginx.conf"),
            "http {\n include sites/*.conf;\n include none/*.conf;\n}\n",
        )
        .unwrap();
        std::fs::write(d.join("sites/b.conf"), "server { listen 2; }\n").unwrap();
        std::fs::write(d.join("sites/a.conf"), "server { listen 1; }\n").unwrap();
        std::fs::write(d.join("sites/.hidden.conf"), "server { listen 3; }\n").unwrap();
        let tree = Parser::parse_main(&d.join("nginx.conf")).unwrap();
        let servers = tree[0].children();
        assert_eq!(servers.len(), 2);
        assert_eq!(servers[0].children()[0].args, ["1"]);
        assert_eq!(&*servers[1].file, d.join("sites/b.conf"));

        std::fs::write(d.join("sites/a.conf"), "include sites/a.conf;\n").unwrap();
        let err = Parser::parse_main(&d.join("nginx.conf")).unwrap_err();
        assert!(err.to_string().contains("include cycle"), "{err}");

        std::fs::write(d.join("nginx.conf"), "events {}\ninclude missing.conf;\n").unwrap();
        let err = Parser::parse_main(&d.join("nginx.conf"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("nginx.conf:2: include \"missing.conf\""),
            "{err}"
        );

        std::fs::write(d.join("sites/a.conf"), "server {\n listen 1;\n").unwrap();
        std::fs::write(d.join("nginx.conf"), "http { include sites/a.conf; }").unwrap();
        let err = Parser::parse_main(&d.join("nginx.conf"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("sites/a.conf:3: unexpected end of file"),
            "{err}"
        );
    }
}
