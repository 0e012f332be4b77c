// Package jsonhttp writes envd's plain-HTTP JSON responses, errors included in the
// {"code": <status>, "message": "…"} shape the E2B SDKs parse.
package jsonhttp

import (
	"encoding/json"
	"net/http"
)

// ErrorBody is the JSON error shape of envd's plain HTTP endpoints.
type ErrorBody struct {
	Code    int    `json:"code"`
	Message string `json:"message"`
}

// Write sends v as JSON with the given status.
func Write(w http.ResponseWriter, status int, v any) {
	body, err := json.Marshal(v)
	if err != nil {
		status = http.StatusInternalServerError
		body, _ = json.Marshal(ErrorBody{Code: status, Message: "encode response: " + err.Error()})
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = w.Write(body)
}

// Error sends {"code": status, "message": msg}.
func Error(w http.ResponseWriter, status int, msg string) {
	Write(w, status, ErrorBody{Code: status, Message: msg})
}
