#!/usr/bin/env python3
"""Turns docs/CONFIG.md into the roff man page tenement.toml(5), so the page never drifts from
the reference it is made of. Handles the Markdown that file uses and nothing more: headings,
paragraphs, bullet lists, fenced code, pipe tables, `code`, **bold** and [links](...).

Usage: md2man.py CONFIG.md VERSION > tenement.toml.5
"""
import re
import sys

NAME = "tenement.toml \\- configuration of tenement-supervisor, tenement-proxy and tenctl"
SEE_ALSO = ".BR tenctl (1),\n.BR systemd.socket (5),\n.BR systemd.exec (5)"


def escape(text):
    """Escapes roff specials in plain text."""
    text = text.replace("\\", "\\e")
    text = text.replace("-", "\\-")
    return text


def inline(text):
    """Markdown inline markup to roff font changes (on escaped text)."""
    text = re.sub(r"\[([^\]]+)\]\([^)]+\)", r"\1", text)
    parts = re.split(r"(`[^`]+`)", text)
    out = []
    for part in parts:
        if part.startswith("`") and part.endswith("`") and len(part) > 1:
            out.append("\\fB" + escape(part[1:-1]) + "\\fR")
        else:
            piece = escape(part)
            piece = re.sub(r"\*\*([^*]+)\*\*", r"\\fB\1\\fR", piece)
            piece = re.sub(r"(?<![\w*])\*([^*]+)\*(?![\w*])", r"\\fI\1\\fR", piece)
            out.append(piece)
    return "".join(out)


def line_safe(text):
    """A roff text line must not start with a control character."""
    if text.startswith((".", "'")):
        return "\\&" + text
    return text


def cells(row):
    row = row.strip()
    if row.startswith("|"):
        row = row[1:]
    if row.endswith("|"):
        row = row[:-1]
    # A `|` inside backticks is content, not a separator.
    parts, current, in_code = [], "", False
    for ch in row:
        if ch == "`":
            in_code = not in_code
        if ch == "|" and not in_code:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    parts.append(current.strip())
    return parts


def convert(markdown, version):
    out = [
        ".\\\" Generated from docs/CONFIG.md by packaging/man/md2man.py; edit that file instead.",
        f'.TH TENEMENT.TOML 5 "" "tenement {version}" "tenement manual"',
        ".SH NAME",
        NAME,
    ]
    lines = markdown.splitlines()
    i = 0
    paragraph = []

    def flush():
        if paragraph:
            out.append(".PP")
            out.append(line_safe(inline(" ".join(paragraph))))
            paragraph.clear()

    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith("```"):
            flush()
            out.append(".PP")
            out.append(".nf")
            out.append(".RS 4")
            i += 1
            while i < len(lines) and not lines[i].strip().startswith("```"):
                out.append(line_safe(escape(lines[i])))
                i += 1
            out.append(".RE")
            out.append(".fi")
        elif stripped.startswith("# "):
            flush()
            out.append(".SH DESCRIPTION")
        elif stripped.startswith("## "):
            flush()
            out.append(".SH " + escape(stripped[3:].replace("`", "")).upper())
        elif stripped.startswith("### "):
            flush()
            out.append(".SS " + escape(stripped[4:].replace("`", "")))
        elif stripped.startswith("|"):
            flush()
            header = cells(stripped)
            i += 2  # the header row and the |---| row
            while i < len(lines) and lines[i].strip().startswith("|"):
                row = cells(lines[i])
                out.append(".TP")
                out.append(line_safe(inline(row[0])))
                if len(header) == 3 and len(row) == 3:
                    out.append(line_safe(f"({inline(header[1])}: {inline(row[1])})"))
                    out.append(".br")
                    out.append(line_safe(inline(row[2])))
                else:
                    out.append(line_safe(inline(" ".join(row[1:]))))
                i += 1
            continue
        elif stripped.startswith("- "):
            flush()
            item = [stripped[2:]]
            i += 1
            while i < len(lines) and lines[i].startswith("  ") and lines[i].strip():
                item.append(lines[i].strip())
                i += 1
            out.append(".IP \\(bu 2")
            out.append(line_safe(inline(" ".join(item))))
            continue
        elif not stripped:
            flush()
        else:
            paragraph.append(stripped)
        i += 1
    flush()
    out.append(".SH FILES")
    out.append(".TP")
    out.append(".I /etc/tenement/tenement.toml")
    out.append("The default location, read by every tenement binary; a conffile of the package.")
    out.append(".SH SEE ALSO")
    out.append(SEE_ALSO)
    return "\n".join(out) + "\n"


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: md2man.py CONFIG.md VERSION")
    with open(sys.argv[1], encoding="utf-8") as f:
        sys.stdout.write(convert(f.read(), sys.argv[2]))


if __name__ == "__main__":
    main()
