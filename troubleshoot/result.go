// Package troubleshoot checks an installation from the user's side: the
// cluster parts (CSIDriver, DaemonSet, registration on every node, the
// webhook and its certificate), a namespace's or pod's injection, network
// policies and the Istio mesh. Fetch reads what the checks need with the
// user's credentials; the checks are pure functions of that Snapshot.
package troubleshoot

// Status of one check.
type Status string

// Statuses, worst last.
const (
	OK      Status = "ok"
	Warning Status = "warning"
	Failure Status = "failure"
)

// Result is one check's outcome: what was checked, about what, what was
// found and, unless OK, the fix in one line.
type Result struct {
	Check   string `json:"check"`
	Subject string `json:"subject,omitempty"`
	Status  Status `json:"status"`
	Message string `json:"message"`
	Fix     string `json:"fix,omitempty"`
}

// Failed reports whether any result is a Failure.
func Failed(rs []Result) bool {
	for _, r := range rs {
		if r.Status == Failure {
			return true
		}
	}
	return false
}

func ok(check, subject, msg string) Result {
	return Result{Check: check, Subject: subject, Status: OK, Message: msg}
}

func warn(check, subject, msg, fix string) Result {
	return Result{Check: check, Subject: subject, Status: Warning, Message: msg, Fix: fix}
}

func fail(check, subject, msg, fix string) Result {
	return Result{Check: check, Subject: subject, Status: Failure, Message: msg, Fix: fix}
}
