//! Placeholders in `command`, `args` and `env` values: `{data_dir}`, `{id}`, `{service}`,
//! `{instance}`, `{port}`, `{socket_path}`; `{{` and `}}` are literal braces.
//!
//! Templates are parsed when the config is validated, so an unknown placeholder is a config
//! error, and rendered by the supervisor with values that are themselves validated (ids are DNS
//! labels, paths are built by the supervisor), so nothing a client sends is ever interpolated.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Var {
    /// The service's data root, `<settings.data_dir>/<service>`.
    DataDir,
    Id,
    Service,
    /// `service:id`.
    Instance,
    Port,
    SocketPath,
}

impl Var {
    fn from_name(name: &str) -> Option<Var> {
        Some(match name {
            "data_dir" => Var::DataDir,
            "id" => Var::Id,
            "service" => Var::Service,
            "instance" => Var::Instance,
            "port" => Var::Port,
            "socket_path" => Var::SocketPath,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Var(Var),
}

/// A parsed template string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
}

/// The values a template is rendered with.
#[derive(Debug, Clone, Default)]
pub struct TemplateVars<'a> {
    pub data_dir: &'a str,
    pub id: &'a str,
    pub service: &'a str,
    pub instance: &'a str,
    /// Empty when the instance has no TCP port.
    pub port: &'a str,
    /// Empty when the instance has no Unix socket.
    pub socket_path: &'a str,
}

impl Template {
    /// Parses `source`; the error names the bad placeholder and lists the good ones.
    pub fn parse(source: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = source.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            match c {
                '{' if chars.peek().map(|&(_, c)| c) == Some('{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek().map(|&(_, c)| c) == Some('}') => {
                    chars.next();
                    literal.push('}');
                }
                '{' => {
                    let rest = &source[i + 1..];
                    let Some(end) = rest.find('}') else {
                        return Err(format!(
                            "unclosed '{{' in {source:?}; write {{{{ for a literal brace"
                        ));
                    };
                    let name = &rest[..end];
                    let Some(var) = Var::from_name(name) else {
                        // The name is file text: escaped, so a `\n` in it cannot split the
                        // one-line diagnostic this becomes.
                        return Err(format!(
                            "unknown placeholder {{{}}} in {source:?}; known: {{data_dir}}, {{id}}, {{service}}, {{instance}}, {{port}}, {{socket_path}}",
                            name.escape_debug()
                        ));
                    };
                    if !literal.is_empty() {
                        parts.push(Part::Literal(std::mem::take(&mut literal)));
                    }
                    parts.push(Part::Var(var));
                    for _ in 0..=name.chars().count() {
                        chars.next();
                    }
                }
                '}' => {
                    return Err(format!(
                        "unmatched '}}' in {source:?}; write }}}} for a literal brace"
                    ))
                }
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        Ok(Template {
            source: source.to_owned(),
            parts,
        })
    }

    /// A template with no placeholders.
    pub fn literal(text: &str) -> Template {
        Template {
            source: text.replace('{', "{{").replace('}', "}}"),
            parts: vec![Part::Literal(text.to_owned())],
        }
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether the template uses `var`.
    pub fn uses(&self, var: Var) -> bool {
        self.parts.contains(&Part::Var(var))
    }

    pub fn render(&self, vars: &TemplateVars<'_>) -> String {
        let mut out = String::with_capacity(self.source.len() + 32);
        for part in &self.parts {
            match part {
                Part::Literal(text) => out.push_str(text),
                Part::Var(Var::DataDir) => out.push_str(vars.data_dir),
                Part::Var(Var::Id) => out.push_str(vars.id),
                Part::Var(Var::Service) => out.push_str(vars.service),
                Part::Var(Var::Instance) => out.push_str(vars.instance),
                Part::Var(Var::Port) => out.push_str(vars.port),
                Part::Var(Var::SocketPath) => out.push_str(vars.socket_path),
            }
        }
        out
    }
}

/// A template is stored as its source text (a release snapshot keeps its templates) and parsed
/// again when read, so a stored template is as valid as one in the config file.
impl serde::Serialize for Template {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.source)
    }
}

impl<'de> serde::Deserialize<'de> for Template {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let source = String::deserialize(deserializer)?;
        Template::parse(&source).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> TemplateVars<'static> {
        TemplateVars {
            data_dir: "/d/notes",
            id: "alice",
            service: "notes",
            instance: "notes:alice",
            port: "20001",
            socket_path: "",
        }
    }

    #[test]
    fn renders_every_placeholder() {
        let t = Template::parse("{data_dir}/{id} {service} {instance} :{port}").expect("valid");
        assert_eq!(t.render(&vars()), "/d/notes/alice notes notes:alice :20001");
    }

    #[test]
    fn doubled_braces_are_literal() {
        let t = Template::parse("{{x}} {id}").expect("valid");
        assert_eq!(t.render(&vars()), "{x} alice");
        assert_eq!(Template::literal("{a}").render(&vars()), "{a}");
    }

    #[test]
    fn unknown_and_unbalanced_placeholders_are_errors() {
        assert!(Template::parse("{home}")
            .expect_err("unknown")
            .contains("unknown placeholder {home}"));
        assert!(Template::parse("{id")
            .expect_err("unclosed")
            .contains("unclosed"));
        assert!(Template::parse("id}")
            .expect_err("unmatched")
            .contains("unmatched"));
    }

    #[test]
    fn unicode_literals_survive() {
        let t = Template::parse("é{id}ü").expect("valid");
        assert_eq!(t.render(&vars()), "éaliceü");
    }
}
