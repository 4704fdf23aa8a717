// notes-go: the notes app (examples/README.md) in Go, standard library only (Go 1.19+).
// A tiny single-tenant notes service that knows nothing about tenants: tenement runs one copy
// per tenant and gives each its own DATA_DIR.
//
// Listening, first match wins:
//
//	LISTEN_FDS + LISTEN_PID=<this pid>  serve on the inherited socket, fd 3 (socket activation)
//	SOCKET_PATH=/path                   bind this Unix stream socket
//	HOST (127.0.0.1) and PORT (8000)    bind TCP
//
// DATA_DIR (./data) holds notes.jsonl and token. NOTIFY_SOCKET, if set, gets READY=1 once
// listening (sd_notify protocol).
//
// Routes: GET /health, GET /token, GET and POST /notes (Authorization: Bearer <token>), GET /.
package main

import (
	"bytes"
	"crypto/rand"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unicode/utf8"
)

const (
	maxBody     = 64 << 10 // bytes; a note is text, not an upload
	runtimeName = "go"
	textType    = "text/plain; charset=utf-8"
	jsonType    = "application/json"
	help        = `notes: a single-tenant notes service (examples/README.md)
GET  /health  status, runtime, service and tenant (JSON)
GET  /token   this tenant's bearer token
GET  /notes   the notes (JSON); needs Authorization: Bearer <token>
POST /notes   add the body as a note; needs Authorization: Bearer <token>
`
)

// routes maps each path to the methods it answers; anything else is 404, or 405 with Allow.
var routes = map[string][]string{
	"/":       {"GET", "HEAD"},
	"/health": {"GET", "HEAD"},
	"/token":  {"GET", "HEAD"},
	"/notes":  {"GET", "HEAD", "POST"},
}

var (
	requestLog = log.New(os.Stdout, "", 0) // one line per request; unbuffered, one write each
	errorLog   = log.New(os.Stderr, "", 0)
)

// httpError is an answer other than success: status, one-line message, extra headers.
type httpError struct {
	status  int
	message string
	header  map[string]string
}

func (e *httpError) Error() string { return e.message }

func fail(status int, message string) error {
	return &httpError{status: status, message: message}
}

// note is one line of notes.jsonl and one element of GET /notes, fields in this order.
type note struct {
	ID      int    `json:"id"`
	Text    string `json:"text"`
	Created string `json:"created"`
}

// store keeps the notes in $DATA_DIR/notes.jsonl, one JSON object per line, oldest first.
// Note N is line N, so the next id is the line count plus one. Appends go one at a time and
// each is fsynced before it counts; size is the length of the counted lines.
type store struct {
	mu    sync.Mutex // serializes appends
	file  *os.File
	count int // guarded by mu
	size  atomic.Int64
}

func openStore(dir string) (*store, error) {
	path := filepath.Join(dir, "notes.jsonl")
	file, err := os.OpenFile(path, os.O_RDWR|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return nil, err
	}
	data, err := io.ReadAll(file)
	if err != nil {
		return nil, err
	}
	end := bytes.LastIndexByte(data, '\n') + 1
	if end < len(data) {
		// A crash in the middle of an append: that note was never acknowledged.
		errorLog.Printf("notes: dropping an incomplete last line of %s", path)
		if err := file.Truncate(int64(end)); err != nil {
			return nil, err
		}
	}
	s := &store{file: file, count: bytes.Count(data[:end], []byte{'\n'})}
	s.size.Store(int64(end))
	return s, nil
}

// add appends a note, fsyncs it and returns its id.
func (s *store) add(text string) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := note{ID: s.count + 1, Text: text, Created: time.Now().UTC().Format("2006-01-02T15:04:05Z")}
	line := toJSON(n)
	_, err := s.file.Write(line)
	if err == nil {
		err = s.file.Sync()
	}
	if err != nil {
		// Leave no partial or unacknowledged line behind: the next note gets this id.
		s.file.Truncate(s.size.Load())
		return 0, err
	}
	s.size.Add(int64(len(line)))
	s.count++
	return n.ID, nil
}

// json returns the notes as a JSON array, ready to send.
func (s *store) json() ([]byte, error) {
	size := s.size.Load() // only appends completed by now; one may be under way past it
	if size == 0 {
		return []byte("[]\n"), nil
	}
	data := make([]byte, size)
	if _, err := s.file.ReadAt(data, 0); err != nil {
		return nil, err
	}
	// Each line is already a note in JSON, and JSON escapes newlines in the text: the array
	// is the lines joined with commas.
	body := append([]byte{'['}, bytes.ReplaceAll(data[:size-1], []byte{'\n'}, []byte{','})...)
	return append(body, "]\n"...), nil
}

// toJSON is compact JSON and a newline, the shape all three notes apps send.
func toJSON(v any) []byte {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false) // "<" stays "<", not "\u003c"
	enc.Encode(v)            // cannot fail for the types used here
	return b.Bytes()
}

// loadToken returns this tenant's bearer token: made once, kept in $DATA_DIR/token (0600,
// atomic).
func loadToken(dir string) (string, error) {
	path := filepath.Join(dir, "token")
	data, err := os.ReadFile(path)
	if err == nil {
		if token := strings.TrimSpace(string(data)); len(token) == 64 {
			return token, nil
		}
	} else if !errors.Is(err, fs.ErrNotExist) {
		return "", err
	}
	raw := make([]byte, 32)
	if _, err := rand.Read(raw); err != nil {
		return "", err
	}
	token := hex.EncodeToString(raw)
	tmp := fmt.Sprintf("%s.%d.tmp", path, os.Getpid())
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return "", err
	}
	_, err = f.WriteString(token + "\n")
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	return token, err
}

// syncDir makes new directory entries (the token's rename, a new notes.jsonl) durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

type app struct {
	store  *store
	token  string
	health []byte
}

func (a *app) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	err := a.route(w, r)
	var he *httpError
	switch {
	case err == nil:
	case errors.As(err, &he):
		reply(w, r, he.status, textType, []byte(he.message+"\n"), he.header)
	default:
		errorLog.Printf("error: %s %s: %v", r.Method, r.RequestURI, err)
		reply(w, r, http.StatusInternalServerError, textType, []byte("internal error\n"), nil)
	}
}

func (a *app) route(w http.ResponseWriter, r *http.Request) error {
	path := r.URL.Path
	methods, known := routes[path]
	if !known {
		return fail(http.StatusNotFound, "not found")
	}
	if !contains(methods, r.Method) {
		return &httpError{
			status:  http.StatusMethodNotAllowed,
			message: "method not allowed",
			header:  map[string]string{"Allow": strings.Join(methods, ", ")},
		}
	}
	switch {
	case path == "/health":
		reply(w, r, http.StatusOK, jsonType, a.health, nil)
	case path == "/token":
		reply(w, r, http.StatusOK, textType, []byte(a.token+"\n"), nil)
	case path == "/":
		reply(w, r, http.StatusOK, textType, []byte(help), nil)
	case r.Method == http.MethodPost:
		if err := a.authenticate(r); err != nil {
			return err
		}
		return a.addNote(w, r)
	default:
		if err := a.authenticate(r); err != nil {
			return err
		}
		body, err := a.store.json()
		if err != nil {
			return err
		}
		reply(w, r, http.StatusOK, jsonType, body, nil)
	}
	return nil
}

func (a *app) authenticate(r *http.Request) error {
	scheme, given, _ := strings.Cut(strings.TrimSpace(r.Header.Get("Authorization")), " ")
	given = strings.TrimSpace(given)
	if !strings.EqualFold(scheme, "bearer") || given == "" {
		return &httpError{
			status:  http.StatusUnauthorized,
			message: "authorization required: Authorization: Bearer <token from /token>",
			header:  map[string]string{"WWW-Authenticate": `Bearer realm="notes"`},
		}
	}
	// Constant time for equal lengths; the length is no secret (always 64).
	if subtle.ConstantTimeCompare([]byte(given), []byte(a.token)) != 1 {
		return fail(http.StatusForbidden, "this token does not open these notes")
	}
	return nil
}

func (a *app) addNote(w http.ResponseWriter, r *http.Request) error {
	// net/http has already refused a malformed Content-Length (with its own 400).
	if len(r.TransferEncoding) > 0 {
		return fail(http.StatusBadRequest, "chunked bodies are not supported; send Content-Length")
	}
	if r.ContentLength > maxBody {
		return fail(http.StatusRequestEntityTooLarge,
			fmt.Sprintf("note too large (max %d bytes)", maxBody))
	}
	raw, err := io.ReadAll(r.Body)
	if err != nil {
		return fmt.Errorf("reading the body: %w", err)
	}
	if !utf8.Valid(raw) {
		return fail(http.StatusBadRequest, "the note must be UTF-8 text")
	}
	text := strings.TrimSpace(string(raw))
	if text == "" {
		return fail(http.StatusBadRequest, "empty note; send the text as the request body")
	}
	id, err := a.store.add(text)
	if err != nil {
		return err
	}
	reply(w, r, http.StatusCreated, jsonType, toJSON(map[string]int{"id": id}),
		map[string]string{"Location": fmt.Sprintf("/notes/%d", id)})
	return nil
}

// reply sends a whole response (HEAD: the headers only) and logs the request on stdout.
func reply(w http.ResponseWriter, r *http.Request, status int, contentType string, body []byte,
	header map[string]string) {
	h := w.Header()
	h.Set("Content-Type", contentType)
	h.Set("Content-Length", strconv.Itoa(len(body)))
	for k, v := range header {
		h[k] = []string{v} // as written: Header.Set would send "Www-Authenticate"
	}
	w.WriteHeader(status)
	if r.Method != http.MethodHead {
		w.Write(body)
	}
	client, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		client = "unix"
	}
	requestLog.Printf("%s %q %d %d", client, r.Method+" "+r.RequestURI+" "+r.Proto, status, len(body))
}

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

// listen picks the listener in the contract's order. It returns the listener, a description
// for the log and the socket file to remove on exit ("" if none).
func listen() (net.Listener, string, string, error) {
	fds, _ := strconv.Atoi(os.Getenv("LISTEN_FDS"))
	if fds >= 1 && os.Getenv("LISTEN_PID") == strconv.Itoa(os.Getpid()) {
		for _, k := range []string{"LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"} {
			os.Unsetenv(k) // do not leak them to anything we might run
		}
		f := os.NewFile(3, "LISTEN_FD_3")
		l, err := net.FileListener(f) // a duplicate of fd 3
		f.Close()
		if err != nil {
			return nil, "", "", fmt.Errorf("fd 3: %w", err)
		}
		return l, "fd 3 (" + describe(l.Addr()) + ")", "", nil
	}
	if path := os.Getenv("SOCKET_PATH"); path != "" {
		if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return nil, "", "", err // a stale socket from a previous run is removed
		}
		l, err := net.Listen("unix", path)
		if err != nil {
			return nil, "", "", err
		}
		return l, "unix:" + path, path, nil
	}
	host, port := getenv("HOST", "127.0.0.1"), getenv("PORT", "8000")
	if _, err := strconv.ParseUint(port, 10, 16); err != nil {
		return nil, "", "", fmt.Errorf("PORT must be a port number, got %q", port)
	}
	l, err := net.Listen("tcp", net.JoinHostPort(host, port))
	if err != nil {
		return nil, "", "", err
	}
	return l, describe(l.Addr()), "", nil
}

func describe(addr net.Addr) string {
	if addr.Network() == "unix" {
		return "unix:" + addr.String()
	}
	return addr.String()
}

func getenv(key, fallback string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return fallback
}

// envOrNull is the variable's value, or nil (JSON null) when it is unset.
func envOrNull(key string) *string {
	if v, ok := os.LookupEnv(key); ok {
		return &v
	}
	return nil
}

// notifyReady sends READY=1 to $NOTIFY_SOCKET (sd_notify). Go turns a leading '@' into
// Linux's abstract namespace itself.
func notifyReady() {
	target := os.Getenv("NOTIFY_SOCKET")
	if target == "" {
		return
	}
	conn, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: target, Net: "unixgram"})
	if err == nil {
		_, err = conn.Write([]byte("READY=1"))
		conn.Close()
	}
	if err != nil {
		errorLog.Printf("notes: cannot notify %s: %v", target, err)
	}
}

// start opens the data directory, binds the listener and sets up the server.
func start() (*http.Server, net.Listener, string, error) {
	dir, err := filepath.Abs(getenv("DATA_DIR", "./data"))
	if err != nil {
		return nil, nil, "", err
	}
	if err := os.MkdirAll(dir, 0o777); err != nil {
		return nil, nil, "", err
	}
	st, err := openStore(dir)
	if err != nil {
		return nil, nil, "", err
	}
	token, err := loadToken(dir)
	if err != nil {
		return nil, nil, "", err
	}
	if err := syncDir(dir); err != nil {
		return nil, nil, "", err
	}
	l, where, socketFile, err := listen()
	if err != nil {
		return nil, nil, "", err
	}
	a := &app{
		store: st,
		token: token,
		health: toJSON(struct {
			Status  string  `json:"status"`
			Runtime string  `json:"runtime"`
			Service *string `json:"service"`
			Tenant  *string `json:"tenant"`
		}{"ok", runtimeName, envOrNull("TENEMENT_SERVICE"), envOrNull("TENEMENT_ID")}),
	}
	srv := &http.Server{
		Handler:           a,
		ReadHeaderTimeout: 10 * time.Second,
		// Kept-alive connections (the proxy pools them) outlive short pauses between requests.
		IdleTimeout: 30 * time.Second,
		ErrorLog:    errorLog,
	}
	fmt.Printf("notes listening on %s (data in %s)\n", where, dir)
	return srv, l, socketFile, nil
}

func main() {
	// From the first moment: a SIGTERM during start-up waits in the channel.
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, os.Interrupt)

	srv, l, socketFile, err := start()
	if err != nil {
		errorLog.Printf("notes: cannot start: %v", err)
		os.Exit(1)
	}
	notifyReady()
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()

	select {
	case <-stop:
		// At once: no waiting for kept-alive connections, as http.Server.Shutdown would.
	case err := <-served:
		errorLog.Printf("notes: %v", err)
		os.Exit(1)
	}
	if socketFile != "" {
		os.Remove(socketFile)
	}
	fmt.Println("notes stopped")
}
