"""HTML → Markdown on chat-export HTML: golden cases in the markup the ChatGPT page exported
(ShareGPT), and the export residue that must not survive."""

from __future__ import annotations

import pytest

from vicuna_cli.data.html import clean_markdown, html_to_markdown, looks_like_html

SVG = '<svg stroke="currentColor" fill="none" stroke-width="2" viewBox="0 0 24 24" class="h-4 w-4" height="1em" width="1em" xmlns="http://www.w3.org/2000/svg"><path d="M16 4h2a2 2 0 0 1 2 2v14a2 2 0 0 1-2 2H6a2 2 0 0 1-2-2V6a2 2 0 0 1 2-2h2"></path><rect x="8" y="2" width="8" height="4" rx="1" ry="1"></rect></svg>'
CODE = ('<div class="markdown prose w-full break-words dark:prose-invert light"><p>Here is a function that reverses a string:</p>'
 '<pre><div class="bg-black rounded-md mb-4"><div class="flex items-center relative text-gray-200 bg-gray-800 px-4 py-2 text-xs font-sans justify-between rounded-t-md"><span>python</span>'
 f'<button class="flex ml-auto gap-2">{SVG}Copy code</button></div><div class="p-4 overflow-y-auto"><code class="!whitespace-pre hljs language-python">'
 '<span class="hljs-keyword">def</span> <span class="hljs-title function_">reverse_string</span>(<span class="hljs-params">s: <span class="hljs-built_in">str</span></span>) -&gt; <span class="hljs-built_in">str</span>:\n'
 '    <span class="hljs-comment"># slicing with a step of -1 walks backwards</span>\n'
 '    <span class="hljs-keyword">return</span> s[::-<span class="hljs-number">1</span>]\n'
 '</code></div></div></pre><p>Call it with <code>reverse_string("abc")</code> to get <code>"cba"</code>.</p></div>')
LISTS = ('<div class="markdown prose w-full break-words dark:prose-invert light"><p>To set up the project:</p><ol><li><p>Install the tools:</p><ul><li>Python 3.11</li><li>Node.js 20</li></ul></li>'
 '<li><p>Create a virtual environment:</p><ul><li>run <code>python -m venv .venv</code></li><li>activate it</li></ul></li><li><p>Install the dependencies.</p></li></ol></div>')
TABLE = ('<div class="markdown prose w-full break-words dark:prose-invert light"><p>Here is a comparison:</p><table><thead><tr><th>Language</th><th>Typing</th><th>Speed</th></tr></thead>'
 '<tbody><tr><td>Python</td><td>dynamic</td><td>slow</td></tr><tr><td>Rust</td><td>static</td><td>fast</td></tr></tbody></table></div>')
CJK = ('<div class="markdown prose w-full break-words dark:prose-invert light"><p>안녕하세요! <strong>파이썬</strong>에서 리스트를 정렬하려면 <code>sorted()</code>를 사용하세요.</p>'
 '<ul><li>你好，世界。</li><li>使用 <code>list.sort()</code> 会原地排序。</li></ul></div>')
RESIDUE = ('<div class="flex flex-grow flex-col gap-3"><div class="text-xs">2 / 2</div><div class="min-h-[20px] flex flex-col items-start gap-4 whitespace-pre-wrap"><div class="markdown prose w-full break-words dark:prose-invert light">'
 '<p>Sure.</p><pre><div class="bg-black rounded-md mb-4"><div class="flex items-center relative"><span></span><button class="flex ml-auto gap-2">Copy code</button></div><div class="p-4 overflow-y-auto"><code class="!whitespace-pre hljs"></code></div></div></pre>'
 '<pre><div class="bg-black rounded-md mb-4"><div class="flex items-center relative"><span>bash</span><button class="flex ml-auto gap-2">Copy code</button></div><div class="p-4 overflow-y-auto"><code class="!whitespace-pre hljs language-bash">echo "done"\n</code></div></div></pre></div></div></div>')


GOLDEN = {
    "code block keeps its language, loses the header and the Copy code button": (
        CODE,
        "Here is a function that reverses a string:\n\n"
        "```python\n"
        "def reverse_string(s: str) -> str:\n"
        "    # slicing with a step of -1 walks backwards\n"
        "    return s[::-1]\n"
        "```\n\n"
        'Call it with `reverse_string("abc")` to get `"cba"`.',
    ),
    "nested lists keep their numbering and indentation": (
        LISTS,
        "To set up the project:\n\n"
        "1. Install the tools:\n\n"
        "   - Python 3.11\n"
        "   - Node.js 20\n\n"
        "2. Create a virtual environment:\n\n"
        "   - run `python -m venv .venv`\n"
        "   - activate it\n\n"
        "3. Install the dependencies.",
    ),
    "tables survive as pipe tables": (
        TABLE,
        "Here is a comparison:\n\n"
        "| Language | Typing  | Speed |\n"
        "| -------- | ------- | ----- |\n"
        "| Python   | dynamic | slow  |\n"
        "| Rust     | static  | fast  |",
    ),
    "Korean and Chinese text with inline code and bold": (
        CJK,
        "안녕하세요! **파이썬**에서 리스트를 정렬하려면 `sorted()`를 사용하세요.\n\n"
        "- 你好，世界。\n"
        "- 使用 `list.sort()` 会原地排序。",
    ),
    "regenerate counter, stray div wrappers and an empty copy-code block are removed": (
        RESIDUE,
        'Sure.\n\n```bash\necho "done"\n```',
    ),
}


@pytest.mark.parametrize("name", list(GOLDEN))
def test_golden_chat_export(name):
    html, markdown = GOLDEN[name]
    assert html_to_markdown(html) == markdown


@pytest.mark.parametrize(
    "text, expected",
    [
        # A typed user turn is not HTML: tags and comparisons stay as typed; only the counter goes.
        ("1 / 1Write a poem about <b>cats</b>, please", "Write a poem about <b>cats</b>, please"),
        ("Use 1 / 2 cup of flour; is a < b?", "Use 1 / 2 cup of flour; is a < b?"),
        ("3 / 3\n\nHello", "Hello"),
        ("4 / 2 is two", "4 / 2 is two"),  # not a counter: the first number is larger
        # markdownify-style residue ("pythonCopy code" inside the fence, char counters).
        ("```\npythonCopy code\nprint(1)\n```\nCopy12 chars / 3 words", "```python\nprint(1)\n```"),
        ("```\nCopy code\n```\nafter", "after"),
    ],
)
def test_plain_text_and_residue(text, expected):
    assert html_to_markdown(text) == expected


def test_two_adjacent_code_blocks_stay_two_blocks():
    block = lambda lang, body: (  # noqa: E731
        f'<pre><div class="bg-black"><div class="flex"><span>{lang}</span><button>Copy code</button></div>'
        f'<div><code class="language-{lang}">{body}\n</code></div></div></pre>'
    )
    html = f'<div class="markdown prose">{block("python", "x = 1")}{block("bash", "ls")}</div>'
    assert html_to_markdown(html) == "```python\nx = 1\n```\n\n```bash\nls\n```"


def test_blank_lines_and_literal_tags_inside_code_are_kept():
    text = "Text\n\n\n\nmore </div>\n\n```html\n<div>\n\n\n</div>\n```"
    assert clean_markdown(text) == "Text\n\nmore\n\n```html\n<div>\n\n\n</div>\n```"


def test_only_values_that_start_with_a_block_tag_are_html():
    assert looks_like_html('<div class="markdown prose"><p>x</p></div>')
    assert looks_like_html("  <p>x</p>")
    assert not looks_like_html("What does <div> do in HTML?")
    assert not looks_like_html("<3 thanks")
