"""Request paths: the normal form that is matched and forwarded, and globs whose `*` stays within a segment."""

import pytest

from agentkeys.paths import UnsafePath, normalise_path, path_glob_within, path_matches


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("/v1/chat/completions", "/v1/chat/completions"),
        ("/v1/files/../chat/completions", "/v1/chat/completions"),
        ("/v1/files/%2e%2e/chat/completions", "/v1/chat/completions"),
        ("/v1/files/%2E%2E/chat/completions", "/v1/chat/completions"),
        ("/v1/files/.%2e/chat/completions", "/v1/chat/completions"),
        ("/v1/./chat/./completions", "/v1/chat/completions"),
        ("/v1//chat///completions", "/v1/chat/completions"),
        ("//v1/chat/completions", "/v1/chat/completions"),
        ("/v1/chat/completions/", "/v1/chat/completions"),
        ("/v1/%63hat/completions", "/v1/chat/completions"),  # an escaped ordinary letter is that letter
        ("/v1beta/models/gemini-2.5-flash%3AgenerateContent", "/v1beta/models/gemini-2.5-flash:generateContent"),
        ("/v1/files/file-abc_1.txt~", "/v1/files/file-abc_1.txt~"),
        ("/", "/"),
    ],
)
def test_a_path_is_matched_in_the_form_the_provider_reads(raw, normal):
    assert normalise_path(raw) == normal
    assert normalise_path(normal) == normal  # the normal form is a fixed point


@pytest.mark.parametrize(
    "raw",
    [
        "/v1/files%2f..%2fchat/completions",  # an escaped separator: one server splits on it, another does not
        "/v1/files%2F..%2Fchat/completions",
        "/v1/files%5c..%5cchat/completions",  # an escaped backslash
        "/v1/files/%252e%252e/chat/completions",  # a double escape a second decoding would turn into ..
        "/v1/files/%zz",  # not an escape at all
        "/v1/files/%",
        "/../v1/chat/completions",  # above the root
        "/v1/../../chat/completions",
        "/v1/chat/completions%00",
        "/v1/chat completions",
        "/v1/chat/completions\\..\\x",
        "/v1/chat/cömpletions",
        "v1/chat/completions",
    ],
)
def test_a_path_without_one_meaning_is_refused(raw):
    with pytest.raises(UnsafePath):
        normalise_path(raw)


def test_a_refused_escape_is_named():
    with pytest.raises(UnsafePath, match="%2f"):
        normalise_path("/v1/files%2f..%2fchat")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("v1/chat", "the path 'v1/chat' does not start with '/'"),
        ("/v1/%2F", "the path has an escaped character (%2F) that a provider could read as another path"),
        ("/v1/%7b", "the path has an escaped character (%7b) that a provider could read as another path"),
        ("/v1/%zz", "the path has a '%' that is not a valid percent-escape"),
        ("/v1/a b{", "the path has characters a provider's path never holds: ' {'"),
        ("/v1/../..", "the path climbs above the root with '..'"),
    ],
)
def test_each_refusal_says_what_is_wrong(raw, message):
    with pytest.raises(UnsafePath) as refused:
        normalise_path(raw)
    assert str(refused.value) == message


@pytest.mark.parametrize(
    ("pattern", "path", "matches"),
    [
        ("/v1/files*", "/v1/files", True),
        ("/v1/files*", "/v1/files-x", True),
        ("/v1/files*", "/v1/files/abc", False),  # `*` never crosses `/`
        ("/v1/files/*", "/v1/files/abc", True),
        ("/v1/files/*", "/v1/files/abc/content", False),
        ("/v1/files/**", "/v1/files/abc/content", True),
        ("/v1/files/**", "/v1/files", False),
        ("/v1/*/completions", "/v1/chat/completions", True),
        ("/v1/*/completions", "/v1/a/b/completions", False),
        ("/v1beta/models/*:generateContent", "/v1beta/models/gemini-2.5-flash:generateContent", True),
        ("/v1beta/models/*:generateContent", "/v1beta/models/x/y:generateContent", False),
        ("/v1/models/?", "/v1/models/a", True),
        ("/v1/models/?", "/v1/models/ab", False),
        ("/v1/a.b", "/v1/aXb", False),  # nothing but *, ** and ? is special
        ("/v1/[ab]", "/v1/a", False),
        ("/v1/[ab]", "/v1/[ab]", True),
        ("/**", "/anything/at/all", True),
    ],
)
def test_globs_respect_segments(pattern, path, matches):
    assert path_matches(pattern, path) is matches


@pytest.mark.parametrize(
    ("inner", "outer", "within"),
    [
        ("/v1/files", "/v1/files*", True),
        ("/v1/files/abc", "/v1/files*", False),
        ("/v1/files/*", "/v1/files/*", True),
        ("/v1/files/*", "/v1/files/**", True),
        ("/v1/files/a/**", "/v1/files/**", True),
        ("/v1/files/**", "/v1/files/*", False),  # ** reaches deeper than *
        ("/v1/files*", "/v1/*", True),
        ("/v1/files/x*", "/v1/*", False),  # the extra prefix crosses a segment
        ("/v1/*", "/v1/files*", False),
        ("/v1/**", "/v1/files/**", False),
        ("/v1/files/*", "/v2/**", False),
        ("/v1/a?", "/v1/a*", False),  # unsure: refused
        ("/v1/filesx/*", "/v1/files/**", False),  # under `PREFIX**` means under the whole prefix, `/` included
        ("/v1/files/x/*", "/v1/files/**", True),
        ("/v1/*/x", "/v1/*/**", False),  # an outer prefix with a wildcard: unsure
        ("/v1/ab*", "/v1/a*", True),  # the prefix extended within its segment
        ("/v1/a/*", "/v1/a*", False),  # ... but not into the next one
        ("/v1/a/b*", "/v1/*", False),
        ("/v1/files**", "/v1/*", False),  # ** reaches deeper than *
        ("/v1/**x*", "/v1/*", False),
        ("/v1/?b*", "/v1/*", False),  # a wildcard in the inner prefix: unsure
        ("/v1/ab*", "/v1/x", False),  # a literal outer path holds no pattern
        ("/v1/ab*", "/v1/a", False),
        ("/v1/ab", "/v1/a*", True),  # a literal inner path is matched
        ("/v1/a/b", "/v1/a*", False),
        ("/v1*x*", "/v1***", False),  # a wildcard just before the outer `**`: unsure
    ],
)
def test_a_narrower_glob_is_within_only_when_every_path_it_matches_is(inner, outer, within):
    assert path_glob_within(inner, outer) is within
