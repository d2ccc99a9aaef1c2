package driver

import (
	"context"
	"errors"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/oneagent-csi/oneagent-csi/api"
	"github.com/oneagent-csi/oneagent-csi/provisioner"
)

// Errors of the driver itself; mapped to codes below with everything else.
var (
	errInvalid        = errors.New("invalid request")
	errBusy           = errors.New("another operation on this target is in progress")
	errHostNotAllowed = errors.New("host mode is not allowed for this pod")
	errUnmount        = errors.New("unmount failed")
)

// invalid builds an InvalidArgument error naming the request field.
func invalid(field, reason string) error {
	return &fieldError{field: field, reason: reason}
}

type fieldError struct{ field, reason string }

func (e *fieldError) Error() string { return e.field + ": " + e.reason }
func (e *fieldError) Unwrap() error { return errInvalid }

// toStatus is the one place where errors become gRPC status codes. Codes that
// kubelet treats as non-final (Unavailable, Aborted, DeadlineExceeded) are
// used for everything that may succeed on retry.
func toStatus(err error) error {
	if err == nil {
		return nil
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	var fe *api.FieldError
	code := codes.Internal
	switch {
	case errors.Is(err, errInvalid), errors.As(err, &fe):
		code = codes.InvalidArgument
	case errors.Is(err, provisioner.ErrUnknownTenant):
		code = codes.InvalidArgument
	case errors.Is(err, errBusy):
		code = codes.Aborted
	case errors.Is(err, errHostNotAllowed), errors.Is(err, errRefusedByPolicy):
		code = codes.PermissionDenied
	case errors.Is(err, provisioner.ErrInProgress), errors.Is(err, provisioner.ErrUnavailable),
		errors.Is(err, provisioner.ErrBadArchive):
		code = codes.Unavailable
	case errors.Is(err, provisioner.ErrUnauthorized), errors.Is(err, provisioner.ErrNotFound):
		code = codes.FailedPrecondition
	case errors.Is(err, context.DeadlineExceeded):
		code = codes.DeadlineExceeded
	case errors.Is(err, context.Canceled):
		code = codes.Canceled
	case errors.Is(err, errUnmount):
		code = codes.Internal
	}
	return status.Error(code, err.Error())
}
