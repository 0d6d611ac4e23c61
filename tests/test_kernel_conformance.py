"""The Jupyter project's own conformance suite (jupyter_kernel_test) against llmsh, started the way Jupyter
starts it: the installed kernelspec, `KernelManager(kernel_name="llmsh")`."""

from __future__ import annotations

import jupyter_kernel_test

from llmsh.kernel.lifecycle import install_kernelspec


class LlmshKernelTests(jupyter_kernel_test.KernelTests):
    kernel_name = "llmsh"
    language_name = "llmsh"
    file_extension = ".llmsh"

    code_hello_world = "echo hello, world"
    code_stderr = "nosuchcommand; echo the line goes on"  # the first failure is reported on stderr, the line succeeds
    code_generate_error = "nosuchcommand"
    code_execute_result = [{"code": "uname"}, {"code": "uname --json", "mime": "application/json"}]
    code_inspect_sample = "echo"
    completion_samples = [{"text": "ech", "matches": {"echo"}}, {"text": "unam", "matches": {"uname"}}]
    complete_code_samples = ["echo hi", "echo a && echo b", "echo 'quoted # not a comment'"]
    incomplete_code_samples = ["echo 'unclosed", "echo a &&", "echo a |", "echo a \\"]
    invalid_code_samples = ["echo a ;;", "| echo"]
    supported_history_operations = ("tail", "range", "search")
    code_history_pattern = "uname --j*"
    # not applicable: code_page_something (no pager payloads), code_display_data (results are execute_result)

    @classmethod
    def setUpClass(cls) -> None:
        # Into the isolated JUPYTER_DATA_DIR that conftest set. Telemetry off: the suite expects every iopub message
        # after a request to belong to it, and telemetry is an unsolicited broadcast.
        install_kernelspec(user=True, extra_args=["--telemetry-hz", "0"])
        super().setUpClass()

    def test_zz_manager_interrupt_and_restart(self) -> None:
        """KernelManager.interrupt_kernel (message mode, its own session) stops the running command; restart keeps serving."""
        self.flush_channels()
        msg_id = self.kc.execute("sleep 60")
        busy = self.kc.get_iopub_msg(timeout=15)
        while busy["parent_header"].get("msg_id") != msg_id:
            busy = self.kc.get_iopub_msg(timeout=15)
        self.km.interrupt_kernel()
        reply = self.get_non_kernel_info_reply(timeout=15)
        assert reply is not None
        self.assertEqual(reply["parent_header"]["msg_id"], msg_id)
        self.assertEqual(reply["content"]["ename"], "KeyboardInterrupt")
        pid = self.kc.kernel_info(reply=True, timeout=15)["content"]["llmsh"]["pid"]
        self.km.restart_kernel(now=False)
        self.kc.wait_for_ready(timeout=30)
        info = self.kc.kernel_info(reply=True, timeout=15)["content"]["llmsh"]
        self.assertNotEqual(info["pid"], pid)
        self.assertEqual(self.kc.execute_interactive("echo back", timeout=15)["content"]["status"], "ok")
