/* A real TFLite external delegate for the tests of `nano bench --delegate` (no accelerator's delegate builds for
 * this CPU). It claims the nodes whose builtin code is in its option ops=<codes|all|none> and runs them with their
 * original builtin kernels, so results stay correct. Fully delegating a whole decoder crashes in MEAN (its
 * temporaries are lost on re-allocation): the tests delegate a few operation types only.
 * Build: cc -O2 -shared -fPIC -o libproxy_delegate.so proxy_delegate.c
 * Options: ops="0,18" | "all" | "none"; fail_create=1 -> create returns NULL;
 *          fail_prepare=1 -> delegate Prepare returns kTfLiteDelegateError.
 * Struct layouts follow tensorflow/lite/core/c/common.h (ABI "semi-stable"). */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <stdio.h>

typedef enum { kTfLiteOk = 0, kTfLiteError = 1, kTfLiteDelegateError = 2 } TfLiteStatus;
typedef struct { int size; int data[]; } TfLiteIntArray;
struct TfLiteContext; struct TfLiteDelegate; struct TfLiteRegistration;
typedef struct TfLiteTensor {  /* full layout: context->tensors is an array of these */
  int type; void *data; TfLiteIntArray *dims; float scale; int32_t zero_point;
  int allocation_type; size_t bytes; const void *allocation; const char *name;
  void *delegate; int buffer_handle; bool data_is_stale, is_variable;
  struct { int type; void *params; } quantization; void *sparsity; const TfLiteIntArray *dims_signature;
} TfLiteTensor;
enum { kTfLiteDynamic = 4 };
typedef struct TfLiteNode {
  TfLiteIntArray *inputs, *outputs, *intermediates, *temporaries;
  void *user_data, *builtin_data; const void *custom_initial_data;
  int custom_initial_data_size; struct TfLiteDelegate *delegate; bool might_have_side_effect;
} TfLiteNode;
typedef struct TfLiteRegistration {
  void *(*init)(struct TfLiteContext *, const char *, size_t);
  void (*free)(struct TfLiteContext *, void *);
  TfLiteStatus (*prepare)(struct TfLiteContext *, TfLiteNode *);
  TfLiteStatus (*invoke)(struct TfLiteContext *, TfLiteNode *);
  const char *(*profiling_string)(const struct TfLiteContext *, const TfLiteNode *);
  int32_t builtin_code; const char *custom_name; int version;
  void *registration_external; void *async_kernel; uint64_t inplace_operator;
} TfLiteRegistration;
typedef struct TfLiteContext {
  size_t tensors_size;
  TfLiteStatus (*GetExecutionPlan)(struct TfLiteContext *, TfLiteIntArray **);
  TfLiteTensor *tensors; void *impl_;
  TfLiteStatus (*ResizeTensor)(struct TfLiteContext *, TfLiteTensor *, TfLiteIntArray *);
  void (*ReportError)(struct TfLiteContext *, const char *, ...);
  TfLiteStatus (*AddTensors)(struct TfLiteContext *, int, int *);
  TfLiteStatus (*GetNodeAndRegistration)(struct TfLiteContext *, int, TfLiteNode **, TfLiteRegistration **);
  TfLiteStatus (*ReplaceNodeSubsetsWithDelegateKernels)(struct TfLiteContext *, TfLiteRegistration,
                                                        const TfLiteIntArray *, struct TfLiteDelegate *);
  int recommended_num_threads; void *GetExternalContext, *SetExternalContext;
  bool allow_fp32_relax_to_fp16; void *profiler; void *AllocatePersistentBuffer,
  *AllocateBufferForEval, *RequestScratchBufferInArena, *GetScratchBuffer, *ResizeTensorExplicit,
  *PreviewDelegatePartitioning;
  TfLiteTensor *(*GetTensor)(const struct TfLiteContext *, int);
} TfLiteContext;
typedef struct TfLiteDelegate {
  void *data_;
  TfLiteStatus (*Prepare)(TfLiteContext *, struct TfLiteDelegate *);
  void *CopyFromBufferHandle, *CopyToBufferHandle, *FreeBufferHandle;
  int64_t flags; void *opaque_delegate_builder;
} TfLiteDelegate;
typedef struct { TfLiteDelegate *delegate; TfLiteIntArray *nodes_to_replace, *input_tensors, *output_tensors; } TfLiteDelegateParams;

typedef struct { bool all; bool ops[256]; bool fail_prepare; } Opts;
typedef struct { int n; TfLiteNode *nodes; TfLiteRegistration *regs; int nout; int *outs; } Kernel;

static TfLiteIntArray *arr(int n) { TfLiteIntArray *a = malloc(sizeof(int) * (n + 1)); a->size = n; return a; }
static bool in(const int *v, int n, int x) { for (int i = 0; i < n; i++) if (v[i] == x) return true; return false; }

/* GetNodeAndRegistration is only allowed inside the delegate's Prepare (which is
 * where init runs), so copy the replaced nodes and registrations here. */
static void *k_init(TfLiteContext *c, const char *buf, size_t len) {
  const TfLiteDelegateParams *p = (const TfLiteDelegateParams *)buf; Kernel *k = calloc(1, sizeof *k);
  k->n = p->nodes_to_replace->size;
  k->nodes = calloc(k->n, sizeof(TfLiteNode)); k->regs = calloc(k->n, sizeof(TfLiteRegistration));
  for (int i = 0; i < k->n; i++) {
    TfLiteNode *n; TfLiteRegistration *r;
    if (c->GetNodeAndRegistration(c, p->nodes_to_replace->data[i], &n, &r) != kTfLiteOk) return NULL;
    k->nodes[i] = *n; k->regs[i] = *r;
    k->nodes[i].temporaries = arr(0);  /* ours: kernels may free/replace it */
  }
  k->nout = p->output_tensors->size; k->outs = malloc(sizeof(int) * (k->nout + 1));
  memcpy(k->outs, p->output_tensors->data, sizeof(int) * k->nout); return k;
}
static void k_free(TfLiteContext *c, void *b) {
  Kernel *k = b; if (!k) return;
  for (int i = 0; i < k->n; i++) free(k->nodes[i].temporaries);
  free(k->nodes); free(k->regs); free(k->outs); free(k);
}
static TfLiteStatus k_prepare(TfLiteContext *c, TfLiteNode *self) {
  Kernel *k = self->user_data; int ntemp = 0; static int temps[65536];
  for (int i = 0; i < k->n; i++) {
    TfLiteNode *n = &k->nodes[i]; TfLiteRegistration *r = &k->regs[i];
    for (int j = 0; j < n->outputs->size; j++) {  /* partition-internal tensors: heap-allocate */
      int t = n->outputs->data[j];
      if (t >= 0 && !in(k->outs, k->nout, t)) c->tensors[t].allocation_type = kTfLiteDynamic;
    }
    if (r->prepare && r->prepare(c, n) != kTfLiteOk) return kTfLiteError;
    if (n->temporaries) for (int j = 0; j < n->temporaries->size && ntemp < 65536; j++) temps[ntemp++] = n->temporaries->data[j];
  }
  free(self->temporaries); self->temporaries = arr(ntemp);  /* let the arena plan the temporaries */
  memcpy(self->temporaries->data, temps, sizeof(int) * ntemp);
  return kTfLiteOk;
}
static TfLiteStatus k_invoke(TfLiteContext *c, TfLiteNode *self) {
  Kernel *k = self->user_data;
  for (int i = 0; i < k->n; i++) {
    TfLiteNode *n = &k->nodes[i];
    if (k->regs[i].invoke(c, n) != kTfLiteOk) return kTfLiteError;
  }
  return kTfLiteOk;
}
static TfLiteStatus d_prepare(TfLiteContext *c, TfLiteDelegate *d) {
  Opts *o = d->data_; TfLiteIntArray *plan;
  if (o->fail_prepare) { c->ReportError(c, "proxy delegate: refusing (fail_prepare=1)"); return kTfLiteDelegateError; }
  if (c->GetExecutionPlan(c, &plan) != kTfLiteOk) return kTfLiteError;
  TfLiteIntArray *sel = arr(plan->size); sel->size = 0;
  for (int i = 0; i < plan->size; i++) {
    TfLiteNode *n; TfLiteRegistration *r; c->GetNodeAndRegistration(c, plan->data[i], &n, &r);
    int code = r->builtin_code;
    if (code == 32 /*CUSTOM*/ || code == 51 /*DELEGATE*/ || code < 0 || code > 255) continue;
    if (o->all || o->ops[code]) sel->data[sel->size++] = plan->data[i];
  }
  TfLiteRegistration reg; memset(&reg, 0, sizeof reg);
  reg.init = k_init; reg.free = k_free; reg.prepare = k_prepare; reg.invoke = k_invoke;
  reg.custom_name = "ProxyDelegate"; reg.version = 1;
  TfLiteStatus s = c->ReplaceNodeSubsetsWithDelegateKernels(c, reg, sel, d);
  free(sel); return s;
}

typedef void (*ErrCb)(const char *);
TfLiteDelegate *tflite_plugin_create_delegate(char **keys, char **values, size_t n, ErrCb report) {
  Opts *o = calloc(1, sizeof *o);
  for (size_t i = 0; i < n; i++) {
    if (!strcmp(keys[i], "fail_create") && !strcmp(values[i], "1")) {
      if (report) { report("proxy delegate: cannot create (fail_create=1)"); } free(o); return NULL;
    } else if (!strcmp(keys[i], "fail_prepare")) o->fail_prepare = !strcmp(values[i], "1");
    else if (!strcmp(keys[i], "ops")) {
      if (!strcmp(values[i], "all")) o->all = true;
      else if (!strcmp(values[i], "none")) ;
      else { char *s = strdup(values[i]), *save = NULL;
        for (char *t = strtok_r(s, ",", &save); t; t = strtok_r(NULL, ",", &save)) { int c = atoi(t); if (c >= 0 && c < 256) o->ops[c] = true; }
        free(s); }
    } else { if (report) { report("proxy delegate: unknown option "); report(keys[i]); } free(o); return NULL; }
  }
  TfLiteDelegate *d = calloc(1, sizeof *d); d->data_ = o; d->Prepare = d_prepare; return d;
}
void tflite_plugin_destroy_delegate(TfLiteDelegate *d) { if (d) { free(d->data_); free(d); } }
